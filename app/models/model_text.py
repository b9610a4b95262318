"""What LightGBM and lleaves take on trust in a model text, checked before either reads it.

A model arrives from the control topic, which anyone who can write it can fill, and its version is
only a hash of its text, which a forger computes too. LightGBM reads each tree at the offset the
`tree_sizes` line gives and follows child indices without bounds checks, and lleaves compiles what
it is given: wrong sizes make `lgb.Booster` read past its buffer and kill the worker (SIGSEGV, again
at every restart, since the control topic is read from its start), a child pointing back makes
every prediction loop forever, a feature index past the row reads other memory. So a model is
checked here, as text, before it is loaded: the trees are where their sizes say, and each is a
tree over the model's own features. Categorical and linear trees, which these pipelines never
train, are refused rather than checked.
"""
from __future__ import annotations


class BadModel(ValueError):
    """A model text that LightGBM or lleaves could not read safely; the message says what is wrong."""


def check(text: bytes) -> None:
    """Raise BadModel unless every tree of the model is where `tree_sizes` says and well-formed."""
    header = _fields(text[:text.find(b"\nTree=")] if b"\nTree=" in text else text)
    try:
        features = int(header.get(b"max_feature_idx", b"")) + 1
    except ValueError:
        raise BadModel("the model has no max_feature_idx") from None
    trees = _trees(text, header.get(b"tree_sizes"))
    for i, tree in enumerate(trees):
        _check_tree(i, _fields(tree), features)


def _fields(block: bytes) -> dict[bytes, bytes]:
    out = {}
    for line in block.split(b"\n"):
        name, sep, value = line.partition(b"=")
        if sep:
            out[name] = value
    return out


def _trees(text: bytes, sizes: bytes | None) -> list[bytes]:
    """The tree blocks, cut where LightGBM will cut them."""
    if sizes is None:  # no sizes: LightGBM reads the trees one after the other
        return text.split(b"\nTree=")[1:]
    try:
        lengths = [int(s) for s in sizes.split()]
    except ValueError:
        raise BadModel("the model's tree_sizes are not numbers") from None
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


def _ints(tree: dict, name: bytes, n: int, i: int) -> list[int]:
    try:
        values = [int(v) for v in tree.get(name, b"").split()]
    except ValueError:
        raise BadModel(f"tree {i}: {name.decode()} is not a list of integers") from None
    if len(values) != n:
        raise BadModel(f"tree {i}: {len(values)} {name.decode()} for {n} nodes")
    return values


def _check_tree(i: int, tree: dict, features: int) -> None:
    try:
        leaves = int(tree.get(b"num_leaves", b""))
    except ValueError:
        raise BadModel(f"tree {i} has no num_leaves") from None
    if not 1 <= leaves <= 1 << 20:
        raise BadModel(f"tree {i}: {leaves} leaves")
    if tree.get(b"num_cat", b"0") != b"0" or tree.get(b"is_linear", b"0") != b"0":
        raise BadModel(f"tree {i}: categorical or linear trees are not supported")
    try:
        leaf_values = [float(v) for v in tree.get(b"leaf_value", b"").split()]
    except ValueError:
        raise BadModel(f"tree {i}: leaf_value is not a list of numbers") from None
    if len(leaf_values) != leaves:
        raise BadModel(f"tree {i}: {len(leaf_values)} leaf values for {leaves} leaves")
    inner = leaves - 1
    if inner == 0:
        return
    for f in _ints(tree, b"split_feature", inner, i):
        if not 0 <= f < features:
            raise BadModel(f"tree {i}: split on feature {f} of {features}")
    try:
        thresholds = tree.get(b"threshold", b"").split()
        [float(t) for t in thresholds]
    except ValueError:
        raise BadModel(f"tree {i}: threshold is not a list of numbers") from None
    if len(thresholds) != inner:
        raise BadModel(f"tree {i}: {len(thresholds)} thresholds for {inner} nodes")
    _ints(tree, b"decision_type", inner, i)
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
