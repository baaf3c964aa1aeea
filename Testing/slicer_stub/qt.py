"""Stand-in for the few qt names the module uses (no GUI is created in tests)."""


class QTimer:
    def __init__(self, *args):
        self.interval = 0
        self.active = False
        self._slots = []

    def setInterval(self, msec):
        self.interval = msec

    def connect(self, signal, slot):
        self._slots.append((signal, slot))

    def start(self, *args):
        self.active = True

    def stop(self):
        self.active = False

    @staticmethod
    def singleShot(msec, callable_):
        callable_()


class QUrl:
    def __init__(self, url=""):
        self.url = url

    @staticmethod
    def fromLocalFile(path):
        return QUrl("file://" + str(path))


class QDesktopServices:
    opened = []

    @staticmethod
    def openUrl(url):
        QDesktopServices.opened.append(url)
        return True
