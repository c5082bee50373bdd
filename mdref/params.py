"""The parameter tree a model file computes from: the checkpoint's nested keys, each node knowing its path.

    p = tree({"down_blocks": {"0": {"resnets": {"0": {...}}}}}, "unet")
    p["down_blocks"][0]["resnets"][0].path      # "unet.down_blocks.0.resnets.0": its trace point's name

A node holding named children is a `Params` (a dict, so a layer's parameters spread as keyword arguments named by
the checkpoint: ``resnet(x, temb, **p)``); a node whose children are numbered (a ModuleList: resnets.0, resnets.1)
is a `Numbered` list, with None at an index that holds no parameters (diffusers' Dropout at ``ff.net.1``, TAESD's
ReLUs). A node's `path` is its key prefix with the component first, which is also the name of the trace point of the
layer it belongs to, so a layer is recorded as ``record(p, x)`` (mdref.trace).
"""

from __future__ import annotations

__all__ = ["Params", "Numbered", "tree"]


class Params(dict):
    """Named children (sub-trees or arrays) and the node's dotted `path`."""
    __slots__ = ("path",)

    def __init__(self, children, path):
        super().__init__(children)
        self.path = path


class Numbered(list):
    """Numbered children in index order (None where an index holds no parameters) and the node's dotted `path`."""
    __slots__ = ("path",)

    def __init__(self, children, path):
        super().__init__(children)
        self.path = path


def tree(node, path=""):
    """A nested dict of arrays (mdref.formats.safetensors.nest of a checkpoint) as a tree of Params / Numbered nodes whose
    paths start with `path` (the component: "unet", "text_encoder"; "" for the decoder, whose keys already start
    with "decoder.")."""
    if not isinstance(node, dict):
        return node
    at = (lambda k: f"{path}.{k}") if path else str
    if node and all(str(k).isdigit() for k in node):
        children = [None] * (1 + max(int(k) for k in node))
        for k, v in node.items():
            children[int(k)] = tree(v, at(k))
        return Numbered(children, path)
    return Params({k: tree(v, at(k)) for k, v in node.items()}, path)
