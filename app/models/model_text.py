"""What LightGBM and lleaves take on trust in a model text, checked before either reads it.

A model arrives from the control topic, which anyone who can write it can fill, and its version is
only a hash of its text, which a forger computes too. LightGBM reads each tree at the offset the
`tree_sizes` line gives and follows child indices without bounds checks, and lleaves compiles what
it is given: wrong sizes make `lgb.Booster` read past its buffer and kill the worker (SIGSEGV, again
at every restart, since the control topic is read from its start), a child pointing back makes
every prediction loop forever, a feature index past the row reads other memory. So a model is
checked here, as text, before it is loaded: the trees are where their sizes say, and each is a
tree over the model's own features. Categorical and linear trees and models of more than one
class or tree per iteration, which these pipelines never train, are refused rather than checked.
Numbers are read as LightGBM reads them, strictly (Python's int() takes "0_1", LightGBM does not), and
a carriage return, which would show the two readers different lines, is refused.
"""
from __future__ import annotations

import re

_INT = re.compile(rb"-?[0-9]{1,10}")
_FLOAT = re.compile(rb"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[-+]?(?:inf|nan)")
MAX_LEAVES = 131072  # LightGBM's own bound on num_leaves


class BadModel(ValueError):
    """A model text that LightGBM or lleaves could not read safely; the message says what is wrong."""


def check(text: bytes) -> None:
    """Raise BadModel unless every tree of the model is where `tree_sizes` says and well-formed."""
    if b"\r" in text:
        raise BadModel("the model has a carriage return")
    header = _fields(text[:text.find(b"\nTree=")] if b"\nTree=" in text else text)
    features = _int(header, b"max_feature_idx", "the model") + 1
    for name in (b"num_class", b"num_tree_per_iteration"):
        if _int(header, name, "the model") != 1:
            raise BadModel(f"the model's {name.decode()} is not 1")
    trees = _trees(text, header.get(b"tree_sizes"))
    for i, tree in enumerate(trees):
        _check_tree(i, _fields(tree), features)


def _fields(block: bytes) -> dict[bytes, bytes]:
    out = {}
    for line in block.split(b"\n"):
        name, sep, value = line.partition(b"=")
        if sep:
            if name in out:
                raise BadModel(f"the model has {name.decode(errors='replace')!r} twice in one block")
            out[name] = value
    return out


def _int(block: dict, name: bytes, where: str) -> int:
    raw = block.get(name, b"")
    if not _INT.fullmatch(raw):
        raise BadModel(f"{where}: {name.decode()} is not an integer")
    return int(raw)


def _trees(text: bytes, sizes: bytes | None) -> list[bytes]:
    """The tree blocks, cut where LightGBM will cut them."""
    if sizes is None:  # no sizes: LightGBM reads the trees one after the other
        return text.split(b"\nTree=")[1:]
    if not all(_INT.fullmatch(n) for n in sizes.split(b" ")):
        raise BadModel("the model's tree_sizes are not numbers")
    lengths = [int(n) for n in sizes.split(b" ")]
    pos = text.find(b"\nTree=0\n") + 1
    if pos == 0:
        raise BadModel("the model has tree_sizes but no Tree=0")
    trees = []
    for i, size in enumerate(lengths):
        head = b"Tree=%d\n" % i
        if size < len(head) or pos + size > len(text) or text[pos:pos + len(head)] != head:
            raise BadModel(f"the model's tree_sizes do not match its trees (tree {i})")
        trees.append(text[pos:pos + size])
        pos += size
    if not text.startswith(b"end of trees", pos):
        raise BadModel("the model's tree_sizes do not match its trees (after the last)")
    return trees


def _numbers(tree: dict, name: bytes, n: int, i: int, pattern: re.Pattern) -> list[bytes]:
    values = tree.get(name, b"").split(b" ")
    if not all(pattern.fullmatch(v) for v in values):
        raise BadModel(f"tree {i}: {name.decode()} is not a list of numbers")
    if len(values) != n:
        raise BadModel(f"tree {i}: {len(values)} {name.decode()} for {n} nodes")
    return values


def _ints(tree: dict, name: bytes, n: int, i: int) -> list[int]:
    return [int(v) for v in _numbers(tree, name, n, i, _INT)]


def _check_tree(i: int, tree: dict, features: int) -> None:
    leaves = _int(tree, b"num_leaves", f"tree {i}")
    if not 1 <= leaves <= MAX_LEAVES:
        raise BadModel(f"tree {i}: {leaves} leaves")
    if tree.get(b"num_cat", b"0") != b"0" or tree.get(b"is_linear", b"0") != b"0":
        raise BadModel(f"tree {i}: categorical or linear trees are not supported")
    _numbers(tree, b"leaf_value", leaves, i, _FLOAT)
    inner = leaves - 1
    if inner == 0:
        return
    for f in _ints(tree, b"split_feature", inner, i):
        if not 0 <= f < features:
            raise BadModel(f"tree {i}: split on feature {f} of {features}")
    _numbers(tree, b"threshold", inner, i, _FLOAT)
    if any(d & 1 for d in _ints(tree, b"decision_type", inner, i)):  # bit 0: a categorical split
        raise BadModel(f"tree {i}: categorical splits are not supported")
    # A tree: every node but the root is the child of exactly one node, and an inner node's inner
    # children come after it, so no walk from the root can come back to a node it passed.
    seen_inner, seen_leaves = {0}, set()
    for node, pair in enumerate(zip(_ints(tree, b"left_child", inner, i), _ints(tree, b"right_child", inner, i))):
        for child in pair:
            if child >= 0:
                if not node < child < inner or child in seen_inner:
                    raise BadModel(f"tree {i}: node {node} has child {child}")
                seen_inner.add(child)
            else:
                if ~child >= leaves or ~child in seen_leaves:
                    raise BadModel(f"tree {i}: node {node} has leaf {~child}")
                seen_leaves.add(~child)
    if len(seen_inner) != inner or len(seen_leaves) != leaves:
        raise BadModel(f"tree {i}: not every node is reached")
