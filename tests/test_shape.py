"""The shape the design card fixes, checked on the source: one-way imports with the toy world and the benchmark as
leaves, grpo.py copy-pasteable, one Janus/Show-o decision per concept file, train.py's functions short."""
import ast
import os
import re
import sys

from data_paths import ROOT

FILES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))


def parsed(name):
    with open(os.path.join(ROOT, name + ".py")) as f:
        return ast.parse(f.read())


def our_imports(name, top_level_only=False):
    """The project modules a file imports, at its top level or anywhere (lazy imports inside functions too)."""
    tree = parsed(name)
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_the_import_graph_has_no_cycle_and_the_toy_world_and_benchmark_are_leaves():
    graph = {f: our_imports(f) & set(FILES) - {f} for f in FILES}
    assert not any("toy" in deps or "bench" in deps for deps in graph.values()), graph
    assert graph["model"] == set(), graph["model"]
    assert graph["reward"] == set(), graph["reward"]  # pure Python
    state = {}

    def visit(f, path):
        if state.get(f) == "done":
            return
        assert state.get(f) != "open", f"import cycle: {' -> '.join(path + [f])}"
        state[f] = "open"
        for g in sorted(graph[f]):
            visit(g, path + [f])
        state[f] = "done"
    for f in FILES:
        visit(f, [])


def test_grpo_imports_only_torch_at_top_level():
    modules = our_imports("grpo", top_level_only=True)
    assert modules - set(sys.stdlib_module_names) == {"torch"}, modules


FAMILY_CHECK = re.compile(r"""(hasattr|getattr)\(\s*\w+\s*,\s*["']showo["']|isinstance\(\s*\w+\s*,\s*\(?\s*(ShowO|Janus)\b""")


def test_each_concept_file_tells_janus_from_showo_at_most_once():
    for f in FILES:
        if f in ("model", "bench"):  # model.py defines both families; the benchmark builds each by hand
            continue
        with open(os.path.join(ROOT, f + ".py")) as fh:
            hits = [i + 1 for i, line in enumerate(fh) if FAMILY_CHECK.search(line)]
        assert len(hits) <= 1, f"{f}.py decides the family on lines {hits}"


def test_train_py_functions_fit_a_screen():
    long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(parsed("train"))
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80}
    assert not long, long


def test_no_core_file_knows_the_toy_world():
    """The toy world reaches the core only by name (its config.json's tokenizer, its train_defaults.json)."""
    toy_names = re.compile(r"\b(PaletteTokenizer|palette|TOY_DEFAULTS|make_toy_tasks|toy_geneval|oracle_reward)\b")
    for f in ("model", "generate", "understand", "reward", "rollout", "sft", "grpo", "train"):
        tree = parsed(f)
        for node in ast.walk(tree):  # docstrings may point at the toy world; code may not
            if hasattr(node, "body") and isinstance(node.body, list):
                node.body = [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        code = ast.unparse(tree)  # without comments
        assert not toy_names.search(code), (f, toy_names.search(code).group())
