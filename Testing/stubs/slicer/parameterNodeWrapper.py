"""Test-only stand-in for ``slicer.parameterNodeWrapper`` (its GUI connectors need Qt/CTK).

It keeps the part that matters outside the GUI: each annotated attribute of the wrapped class
is stored in the real ``vtkMRMLScriptedModuleNode`` (a parameter for str/int/float/bool, a
node reference for MRML nodes), so values travel with the scene as in Slicer. Validators are accepted
and ignored. ``connectGui`` binds, both ways, the widgets whose .ui sets the ``SlicerParameterName`` property
(node selectors, combo boxes, check boxes, spin boxes of the Qt stand-ins in ``Testing/stubs/qt.py``), as
Slicer's connectors do (a combo box without items gets the ``Choice``'s).
"""

import typing

__all__ = ["Choice", "Decimals", "Default", "Maximum", "Minimum", "WithinRange", "parameterNodeWrapper"]


class _Annotation:
    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs


class Choice(_Annotation):
    pass


class Default(_Annotation):
    pass


class WithinRange(_Annotation):
    pass


class Minimum(_Annotation):
    pass


class Maximum(_Annotation):
    pass


class Decimals(_Annotation):
    pass


def _is_node_type(datatype) -> bool:
    return isinstance(datatype, type) and datatype.__name__.startswith("vtkMRML")


def _make_property(name: str, datatype):
    if _is_node_type(datatype):
        def getter(self):
            return self.parameterNode.GetNodeReference(name)

        def setter(self, node):
            self.parameterNode.SetNodeReferenceID(name, node.GetID() if node is not None else None)
    else:
        def getter(self):
            text = self.parameterNode.GetParameter(name)
            if datatype is bool:
                return text == "True"
            return datatype(text)

        def setter(self, value):
            self.parameterNode.SetParameter(name, str(datatype(value)))
    return property(getter, setter)


def _connector(widget):
    """(signal, read, write) binding one widget to its parameter."""
    if hasattr(widget, "setCurrentNode"):
        return "currentNodeChanged", widget.currentNode, widget.setCurrentNode
    if hasattr(widget, "currentText"):
        return "currentIndexChanged", lambda: widget.currentText, lambda value: setattr(widget, "currentText", value)
    if hasattr(widget, "checked"):
        return "toggled", lambda: widget.checked, lambda value: setattr(widget, "checked", value)
    return "valueChanged", lambda: widget.value, lambda value: setattr(widget, "value", value)


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    datatypes = {name: typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
                 for name, hint in hints.items()}

    choices = {name: next((a.args[0] for a in typing.get_args(hint)[1:] if isinstance(a, Choice)), None)
               for name, hint in hints.items() if typing.get_origin(hint) is typing.Annotated}

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for name, datatype in datatypes.items():
            if not _is_node_type(datatype) and not parameterNode.GetParameter(name):
                setattr(self, name, cls.__dict__.get(name, datatype()))

    def connectGui(self, gui):
        connections = []
        for widget in vars(gui).values():
            name = getattr(widget, "SlicerParameterName", None)
            if name not in datatypes:
                continue
            if choices.get(name) and hasattr(widget, "addItem") and not widget.count:
                widget.addItems([str(choice) for choice in choices[name]])  # the connector fills the combo box
            signal, read, write = _connector(widget)
            write(getattr(self, name))  # the GUI shows the parameter node first

            def update(*args, name=name, read=read):
                setattr(self, name, read())

            widget.connect(signal, update)
            connections.append((widget, signal, update))
        return connections

    def disconnectGui(self, tag):
        for widget, signal, update in tag or []:
            widget.disconnect(signal, update)

    members = {"__init__": __init__, "connectGui": connectGui, "disconnectGui": disconnectGui,
               "__doc__": cls.__doc__, "allParameters": dict(datatypes)}
    members.update({name: _make_property(name, datatype) for name, datatype in datatypes.items()})
    return type(cls.__name__, (), members)
