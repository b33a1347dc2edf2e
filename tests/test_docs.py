"""The user documentation: its code runs, it matches the README, and mkdocs builds it with warnings as
errors (the docs extra, also in the test extra so CI builds them)."""
import os
import re
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
MARK = "<!-- docs-test -->"


def _marked_blocks():
    r"""``(page, code)`` of every ```python block right after a ``<!-- docs-test -->`` line."""
    out = []
    for name in sorted(os.listdir(DOCS)):
        if name.endswith(".md"):
            text = open(os.path.join(DOCS, name), encoding="utf-8").read()
            for code in re.findall(re.escape(MARK) + r"\s*\n```python\n(.*?)```", text, re.S):
                out.append((name, code))
    return out


def test_docs_have_runnable_examples():
    pages = {page for page, _ in _marked_blocks()}
    assert {"index.md", "own-data.md"} <= pages


@pytest.mark.parametrize("page, code", _marked_blocks(), ids=lambda v: v if v.endswith(".md") else "")
def test_docs_example_runs(page, code):
    import torch
    torch.manual_seed(0)
    # the block runs as an importable module named after its page: PyG's Sequential imports the
    # module that built it (by file name) into its generated forward, and when that import fails
    # it falls back to the class-level forward of the last Sequential built in the process
    name = os.path.splitext(page)[0]
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    try:
        exec(compile(code, os.path.join(DOCS, page), "exec"), mod.__dict__)
    finally:
        sys.modules.pop(name, None)


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_getting_started_shows_the_readme_commands():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    index = open(os.path.join(DOCS, "index.md"), encoding="utf-8").read()
    main_job, test_cmd = _bash_blocks(readme)[:2]
    assert main_job in _bash_blocks(index) and test_cmd in _bash_blocks(index)


def test_figure_script_runs(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig.png"
    subprocess.run([sys.executable, os.path.join(DOCS, "make_figures.py"), "--out", str(out), "--num-points", "1024"],
                   check=True, capture_output=True, timeout=120,
                   env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert out.stat().st_size > 10_000


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    for page in ("index.html", "concepts/index.html", "api/index.html", "img/bsa_branches.png"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "build_ball_tree" in api and "BSATransformer" in api  # generated from the docstrings
