"""CLEVR's vocabulary of attributes, question types, and an executor for functional programs.

Torch-free. The executor runs programs in the CLEVR v1.0 release schema (a list of nodes
{"function", "inputs", "value_inputs"} in topological order) on CLEVR scene graphs, for the
generator's answers and for checking real CLEVR files.
"""
from __future__ import annotations

ATTRIBUTES = {
    "shape": ("cube", "sphere", "cylinder"),
    "color": ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"),
    "size": ("large", "small"),
    "material": ("rubber", "metal"),
}
RELATIONS = ("left", "right", "front", "behind")

# The paper's five question types (Table 1 columns) from a program's last function.
QUESTION_TYPES = ("count", "exist", "compare_numbers", "query_attribute", "compare_attribute")
SUBTYPES = ("count", "exist", "equal_integer", "less_than", "greater_than",
            "query_size", "query_color", "query_material", "query_shape",
            "equal_size", "equal_color", "equal_material", "equal_shape")


def question_type(subtype: str) -> str:
    if subtype in ("count", "exist"):
        return subtype
    if subtype in ("equal_integer", "less_than", "greater_than"):
        return "compare_numbers"
    if subtype.startswith("query_"):
        return "query_attribute"
    if subtype.startswith("equal_"):
        return "compare_attribute"
    raise ValueError(f"not a CLEVR question subtype: {subtype!r}")


def program_subtype(program: list[dict]) -> str:
    """The 13-way subtype: the program's last function (paper 4.6, Figure 2)."""
    fn = _fn(program[-1])
    if fn not in SUBTYPES:
        raise ValueError(f"program ends in {fn!r}, which is not one of CLEVR's 13 subtypes")
    return fn


def named_attributes(program: list[dict], node: int | None = None) -> int:
    """How many attributes the filter chain feeding `node` (default: the last step) names: "Is
    there a big red cube?" names 3. The generator balances answers within each such count, so the
    number of words cannot tell the answer."""
    node = len(program) - 1 if node is None else node
    n, inputs = 0, program[node].get("inputs", [])
    while inputs and _fn(program[inputs[0]]).startswith("filter_"):
        n += 1
        inputs = program[inputs[0]].get("inputs", [])
    return n


def _fn(node: dict) -> str:
    return node.get("function", node.get("type"))


class ProgramError(ValueError):
    pass


def execute(program: list[dict], scene: dict):
    """Run a program on a scene; returns the answer as CLEVR writes it ("yes", "3", "red")."""
    return _answer_text(_run(program, scene)[-1])


def _run(program: list[dict], scene: dict) -> list:
    """Every node's output, in program order."""
    objs = scene["objects"]
    rel = scene["relationships"]
    outs: list = []
    for node in program:
        fn, args = _fn(node), [outs[i] for i in node.get("inputs", [])]
        vals = node.get("value_inputs", node.get("side_inputs", []))
        outs.append(_step(fn, args, vals, objs, rel))
    return outs


def _answer_text(ans) -> str:
    if isinstance(ans, bool):
        return "yes" if ans else "no"
    return str(ans)


def _step(fn, args, vals, objs, rel):
    if fn == "scene":
        return list(range(len(objs)))
    if fn.startswith("filter_"):
        attr = fn[len("filter_"):]
        return [i for i in args[0] if objs[i][attr] == vals[0]]
    if fn == "unique":
        if len(args[0]) != 1:
            raise ProgramError(f"unique on {len(args[0])} objects")
        return args[0][0]
    if fn == "relate":
        return sorted(rel[vals[0]][args[0]])
    if fn == "count":
        return len(args[0])
    if fn == "exist":
        return len(args[0]) > 0
    if fn.startswith("query_"):
        return objs[args[0]][fn[len("query_"):]]
    if fn.startswith("same_"):
        attr, i = fn[len("same_"):], args[0]
        return [j for j in range(len(objs)) if j != i and objs[j][attr] == objs[i][attr]]
    if fn == "union":
        return sorted(set(args[0]) | set(args[1]))
    if fn == "intersect":
        return sorted(set(args[0]) & set(args[1]))
    if fn in ("equal_integer", "equal_color", "equal_shape", "equal_size", "equal_material"):
        return args[0] == args[1]
    if fn == "less_than":
        return args[0] < args[1]
    if fn == "greater_than":
        return args[0] > args[1]
    raise ProgramError(f"unknown CLEVR function {fn!r}")


# Functions whose output is a set of objects (a list of indices) or one object (an index).
_SET_FUNCTIONS = ("scene", "relate", "union", "intersect")


def _outputs_objects(fn: str) -> bool:
    return fn in _SET_FUNCTIONS or fn == "unique" or fn.startswith(("filter_", "same_"))


def pointed_objects(program: list[dict], scene: dict) -> tuple[list[int], str]:
    """(the objects the question points at, the program's answer): the object sets that the last
    object-valued steps hand on to the answer — the object queried, the objects counted or tested
    for existence, the two sets or objects compared. Raises ProgramError (or KeyError, IndexError,
    TypeError on a malformed program) when the program cannot run on the scene."""
    outs = _run(program, scene)
    pointed: set[int] = set()

    def collect(i: int) -> None:
        fn, out = _fn(program[i]), outs[i]
        if _outputs_objects(fn):
            pointed.update(out if isinstance(out, list) else [out])
        else:                                  # a count, an attribute, a yes/no: look at what it read
            for j in program[i].get("inputs", []):
                collect(j)

    for j in program[-1].get("inputs", []):
        collect(j)
    return sorted(pointed), _answer_text(outs[-1])
