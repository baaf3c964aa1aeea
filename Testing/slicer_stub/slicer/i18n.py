"""Stand-in slicer.i18n (Base/Python/slicer/i18n.py): no translation."""


def tr(text):
    return text


def translate(context, text):
    return text
