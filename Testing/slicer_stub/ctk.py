"""Stand-in ctk: the module uses ctk widgets only through its .ui file."""


class ctkCollapsibleButton:
    pass


class ctkSliderWidget:
    pass


class ctkDirectoryButton:
    pass
