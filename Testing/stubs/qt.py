"""Test-only stand-in for PythonQt's ``qt`` module: enough Qt for the module's Widget to run under pytest.

The Widget (``MedKDSegmentLib/widget.py``) is built from the real ``Resources/UI/MedKDSegment.ui``: ``QUiLoader``
here reads its XML and makes one stand-in per widget, with the properties the file sets. Each stand-in keeps
PythonQt's spelling (properties as attributes, slots as methods, ``connect("signal(args)", slot)``) and Qt's
behaviour where the Widget relies on it: setting a combo box's index, a check box, a spin box or a path emits
the matching signal unless signals are blocked. ``emit`` is the tests' hand: a click, a toggle, a timer tick.
Dialogs answer from ``QInputDialog.answers`` / ``QFileDialog.answers`` (tests fill them). Anything else is absent
and fails loudly. ``../../shared/tools/check_slicer_api.py`` checks the Widget's names against the real Qt API.
"""

from __future__ import annotations

import inspect
import xml.etree.ElementTree as ET
from pathlib import Path


class Qt:
    Unchecked, Checked = 0, 2
    ItemIsSelectable, ItemIsEditable, ItemIsUserCheckable, ItemIsEnabled = 1, 2, 16, 32
    WaitCursor = 16


def _positional_arguments(slot, given: int) -> int:
    parameters = inspect.signature(slot).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return given
    return min(given, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters))


class QObject:
    """Signals by name: ``connect("clicked(bool)", slot)``; ``emit("clicked", False)`` calls the slots."""

    def __init__(self, parent=None) -> None:
        self.__dict__["_slots"] = {}
        self.__dict__["_blocked"] = False
        self.name = ""

    def connect(self, signal: str, slot) -> None:
        self._slots.setdefault(signal.split("(")[0], []).append(slot)

    def disconnect(self, signal: str, slot) -> None:
        self._slots.get(signal.split("(")[0], []).remove(slot)

    def emit(self, signal: str, *args) -> None:
        """Call the slots, each with as many of the signal's arguments as it takes (as PythonQt does)."""
        if not self._blocked:
            for slot in list(self._slots.get(signal, [])):
                slot(*args[:_positional_arguments(slot, len(args))])

    def blockSignals(self, block: bool) -> bool:
        previous = self._blocked
        self.__dict__["_blocked"] = bool(block)
        return previous


class QWidget(QObject):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.enabled, self.visible, self.toolTip, self.styleSheet = True, True, "", ""
        self._children: list = []
        self.scene = None

    def children(self) -> list:
        return list(self._children)

    def setMRMLScene(self, scene) -> None:  # qMRMLWidget and the qMRML* widgets
        self.scene = scene
        for child in self._children:
            child.setMRMLScene(scene)


class QLabel(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.text = ""


class QLineEdit(QLabel):
    pass


class QAbstractButton(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.text = ""
        self.__dict__["_checked"] = False

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        if bool(value) != self._checked:
            self.__dict__["_checked"] = bool(value)
            self.emit("toggled", bool(value))


QPushButton = QCheckBox = QAbstractButton


class ctkCollapsibleButton(QAbstractButton):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.__dict__["_collapsed"] = False

    @property
    def collapsed(self) -> bool:
        return self._collapsed

    @collapsed.setter
    def collapsed(self, value: bool) -> None:
        if bool(value) != self._collapsed:
            self.__dict__["_collapsed"] = bool(value)
            self.emit("contentsCollapsed", bool(value))


class QProgressBar(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.value, self.minimum, self.maximum, self.format = 0, 0, 100, "%p%"


class QDoubleSpinBox(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.minimum, self.maximum, self.decimals, self.singleStep, self.suffix = 0.0, 99.99, 2, 1.0, ""
        self.specialValueText = ""
        self.__dict__["_value"] = 0.0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value) -> None:
        value = min(max(value, self.minimum), self.maximum)
        if value != self._value:
            self.__dict__["_value"] = value
            self.emit("valueChanged", value)


class QSpinBox(QDoubleSpinBox):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.maximum = 99
        self.__dict__["_value"] = 0


class QComboBox(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._items: list[str] = []
        self.__dict__["_index"] = -1

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        index = index if 0 <= index < len(self._items) else -1
        if index != self._index:
            self.__dict__["_index"] = index
            self.emit("currentIndexChanged", index)

    @property
    def currentText(self) -> str:
        return self._items[self._index] if self._index >= 0 else ""

    @currentText.setter
    def currentText(self, text: str) -> None:  # a non-editable combo box selects the item with that text
        if text in self._items:
            self.currentIndex = self._items.index(text)

    def addItem(self, text: str) -> None:
        self._items.append(str(text))
        if self._index < 0:
            self.currentIndex = 0

    def addItems(self, texts) -> None:
        for text in texts:
            self.addItem(text)

    def itemText(self, index: int) -> str:
        return self._items[index]

    def clear(self) -> None:
        self._items = []
        self.currentIndex = -1


class ctkPathLineEdit(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.__dict__["_path"] = ""

    @property
    def currentPath(self) -> str:
        return self._path

    @currentPath.setter
    def currentPath(self, path: str) -> None:
        if str(path) != self._path:
            self.__dict__["_path"] = str(path)
            self.emit("currentPathChanged", str(path))


class qMRMLNodeComboBox(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._node = None

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged", node)


class qMRMLTableView(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.tableNode = None

    def setMRMLTableNode(self, node) -> None:
        self.tableNode = node


class QTableWidgetItem:
    def __init__(self, text: str = "") -> None:
        self._text, self._toolTip, self._flags, self._check = str(text), "", Qt.ItemIsEnabled, None
        self._row = -1

    def text(self) -> str:
        return self._text

    def setText(self, text: str) -> None:
        self._text = str(text)

    def toolTip(self) -> str:
        return self._toolTip

    def setToolTip(self, text: str) -> None:
        self._toolTip = str(text)

    def flags(self) -> int:
        return self._flags

    def setFlags(self, flags: int) -> None:
        self._flags = flags

    def checkState(self):
        return self._check

    def setCheckState(self, state) -> None:
        self._check = state

    def row(self) -> int:
        return self._row


class QTableWidget(QWidget):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.rowCount, self.columnCount, self.headers = 0, 0, []
        self._items: dict = {}
        self._widgets: dict = {}
        self._selected: list = []

    def clear(self) -> None:
        self._items, self._widgets, self._selected, self.headers = {}, {}, [], []

    def setRowCount(self, rows: int) -> None:
        self.rowCount = rows

    def setColumnCount(self, columns: int) -> None:
        self.columnCount = columns

    def setHorizontalHeaderLabels(self, labels) -> None:
        self.headers = list(labels)

    def setItem(self, row: int, column: int, item: QTableWidgetItem) -> None:
        item._row = row
        self._items[(row, column)] = item

    def item(self, row: int, column: int):
        return self._items.get((row, column))

    def setCellWidget(self, row: int, column: int, widget) -> None:
        self._widgets[(row, column)] = widget

    def cellWidget(self, row: int, column: int):
        return self._widgets.get((row, column))

    def resizeColumnsToContents(self) -> None:
        pass

    def selectedItems(self) -> list:
        return list(self._selected)

    def selectRow(self, row: int) -> None:  # the user's click on a row
        self._selected = [item for (r, _c), item in sorted(self._items.items()) if r == row]
        self.emit("itemSelectionChanged")


class QVBoxLayout:
    def __init__(self, parent=None) -> None:
        self.parent = parent

    def addWidget(self, widget) -> None:
        if self.parent is not None:
            self.parent._children.append(widget)


class QTimer(QObject):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.interval, self.active = 0, False

    def setInterval(self, milliseconds: int) -> None:
        self.interval = milliseconds

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False


class QIcon:
    def __init__(self, path: str = "") -> None:
        self.path = path


class QMessageBox:
    Ok, Cancel, Yes, No = 0x400, 0x400000, 0x4000, 0x10000
    NoIcon, Information, Warning, Critical, Question = 0, 1, 2, 3, 4


class QInputDialog:
    answers: list = []  # what the user answers, in order (tests fill it); empty: cancelled

    @classmethod
    def getItem(cls, parent, title, label, items, current=0, editable=True):
        return cls.answers.pop(0) if cls.answers else ""

    @classmethod
    def getText(cls, parent, title, label, *args):
        return cls.answers.pop(0) if cls.answers else ""


class QFileDialog:
    answers: list = []

    @classmethod
    def getOpenFileName(cls, parent, caption="", folder="", filters=""):
        return cls.answers.pop(0) if cls.answers else ""

    @classmethod
    def getExistingDirectory(cls, parent, caption="", folder=""):
        return cls.answers.pop(0) if cls.answers else ""


class QFile:
    ReadOnly = 1

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def open(self, mode) -> bool:
        return self.exists()


# .ui classes made of another stand-in (containers and views the Widget never reads back)
UI_CLASSES = {"QWidget": QWidget, "qMRMLWidget": QWidget, "QGroupBox": QWidget, "QLabel": QLabel,
              "QLineEdit": QLineEdit, "QPushButton": QPushButton, "QCheckBox": QCheckBox, "QComboBox": QComboBox,
              "QSpinBox": QSpinBox, "QDoubleSpinBox": QDoubleSpinBox, "QProgressBar": QProgressBar,
              "QTableWidget": QTableWidget, "ctkCollapsibleButton": ctkCollapsibleButton,
              "ctkPathLineEdit": ctkPathLineEdit, "qMRMLNodeComboBox": qMRMLNodeComboBox,
              "qMRMLTableView": qMRMLTableView}
VALUES = {"string": str, "bool": lambda text: text == "true", "number": int, "double": float}


class QUiLoader:
    """Reads a Qt Designer file into stand-ins: every named widget with the simple properties the file sets."""

    def load(self, qfile: QFile):
        return self._widget(ET.parse(qfile.path).getroot().find("widget"))

    def _widget(self, element):
        widget = UI_CLASSES[element.get("class")]()
        widget.name = element.get("name", "")
        # Ranges first, as Qt Designer's generated code does, so that values are not clamped to the defaults.
        for prop in sorted(element.findall("property"), key=lambda p: p.get("name") not in ("minimum", "maximum")):
            value = next(iter(prop), None)
            if value is not None and value.tag in VALUES and value.text is not None:
                setattr(widget, prop.get("name"), VALUES[value.tag](value.text))
        for item in element.findall("item"):  # a combo box's items
            widget.addItem(item.findtext("property[@name='text']/string") or "")
        for child in self._child_widgets(element):
            widget._children.append(self._widget(child))
        return widget

    @staticmethod
    def _child_widgets(element) -> list:
        found, pending = [], list(element)
        while pending:
            node = pending.pop(0)
            if node.tag == "widget":
                found.append(node)
            elif node.tag in ("layout", "item"):
                pending[:0] = list(node)
        return found


def __getattr__(name: str):
    raise AttributeError(f"qt.{name} has no test stand-in (Testing/stubs/qt.py); add one if the Widget needs it")
