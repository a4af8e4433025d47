"""Every ```python block of README.md and docs/*.md runs, so no example can rot.

The blocks of one page run in order in one namespace (a later block may use the
names of an earlier one), in a temporary working folder of the page's own. A block
preceded by an HTML comment ``<!-- skip: REASON -->`` (needs a GPU, a pod, a
download, or an API still being written: ``pending``) is skipped with that reason;
``BGN_JAX_DOCS_RUN_PENDING=1`` runs the ``pending`` ones too, to see which can be
unmarked.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT_BYTES = 12 * 1024
RUN_PENDING = os.environ.get("BGN_JAX_DOCS_RUN_PENDING") == "1"

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_SKIP = re.compile(r"^\s*<!--\s*skip:\s*(?P<reason>.+?)\s*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
  """One fenced code block of a Markdown page."""

  page: Path
  index: int  # among the page's python blocks
  line: int  # 1-based line of the first line of code
  source: str
  skip: str | None  # the reason of a preceding skip comment


def _skip_marker(before: list[str]) -> re.Match | None:
  """The skip comment among the HTML comments right above a block, if any.

  ``<!-- fmt: off -->`` may sit there too: ruff formats the Python blocks of Markdown.
  """
  for line in reversed(before):
    if not line.strip():
      continue
    if not line.strip().startswith("<!--"):
      return None
    if marker := _SKIP.match(line):
      return marker
  return None


def python_blocks(page: Path) -> list[Block]:
  """The ```python blocks of ``page``, in order, with their skip reasons."""
  lines = page.read_text(encoding="utf-8").splitlines()
  blocks: list[Block] = []
  i = 0
  while i < len(lines):
    opening = _FENCE.match(lines[i])
    if not opening or not opening["info"].strip():
      i += 1
      continue
    fence, indent = opening["fence"], len(opening["indent"])
    language = opening["info"].split()[0].strip("{}.").lower()
    end = i + 1
    while end < len(lines) and not (
      lines[end].strip().startswith(fence) and not lines[end].strip().strip(fence[0])
    ):
      end += 1
    if language in ("python", "py"):
      marker = _skip_marker(lines[:i])
      code = [line[indent:] for line in lines[i + 1 : end]]
      blocks.append(
        Block(page, len(blocks), i + 2, "\n".join(code) + "\n", marker and marker["reason"])
      )
    i = end + 1
  return blocks


BLOCKS = [block for page in PAGES for block in python_blocks(page)]


def _block_id(block: Block) -> str:
  return f"{block.page.relative_to(ROOT)}:{block.line}"


def _skipped(block: Block) -> bool:
  return block.skip is not None and not (RUN_PENDING and block.skip == "pending")


@dataclasses.dataclass
class _PageRun:
  namespace: dict[str, Any]
  folder: Path
  done: int = 0  # blocks run (or skipped) so far
  failed: Block | None = None


_RUNS: dict[Path, _PageRun] = {}


def _run_block(block: Block, run: _PageRun) -> None:
  # Leading newlines make tracebacks show the line numbers of the Markdown page.
  code = compile("\n" * (block.line - 1) + block.source, str(block.page), "exec")
  cwd = os.getcwd()
  os.chdir(run.folder)
  try:
    exec(code, run.namespace)
  finally:
    os.chdir(cwd)


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_code_block_runs(block: Block, tmp_path_factory: pytest.TempPathFactory) -> None:
  if _skipped(block):
    pytest.skip(block.skip)
  run = _RUNS.get(block.page)
  if run is None or run.done > block.index:
    # A real module: dataclasses (flax modules, equinox modules) look their module
    # up in sys.modules.
    module = types.ModuleType(f"_docs_page_{block.page.stem.lower()}")
    sys.modules[module.__name__] = module
    run = _PageRun(module.__dict__, tmp_path_factory.mktemp(block.page.stem))
    _RUNS[block.page] = run
  page_blocks = python_blocks(block.page)
  for earlier in page_blocks[run.done : block.index]:
    if not _skipped(earlier) and run.failed is None:
      try:
        _run_block(earlier, run)
      except Exception:
        run.failed = earlier
    run.done += 1
  if run.failed is not None:
    pytest.skip(f"an earlier block of this page failed: {_block_id(run.failed)}")
  run.done = block.index + 1
  try:
    _run_block(block, run)
  except BaseException:
    run.failed = block
    raise


def test_collector_finds_blocks_and_skip_reasons(tmp_path: Path) -> None:
  page = tmp_path / "page.md"
  page.write_text(
    "text\n```python\na = 1\n```\n\n<!-- skip: needs a GPU -->\n\n```python\nb = 2\n```\n"
    "```bash\nls\n```\n- item\n\n  ```python\n  c = a\n  ```\n"
    "<!-- skip: pending -->\n<!-- fmt: off -->\n```python\nd = 4\n```\n",
    encoding="utf-8",
  )
  blocks = python_blocks(page)
  assert [b.source for b in blocks] == ["a = 1\n", "b = 2\n", "c = a\n", "d = 4\n"]
  assert [b.skip for b in blocks] == [None, "needs a GPU", None, "pending"]
  assert [b.line for b in blocks] == [3, 9, 17, 22]


def test_readme_is_a_landing_page() -> None:
  size = len((ROOT / "README.md").read_bytes())
  assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes; the limit is 12 KiB."


def _commands(text: str) -> list[str]:
  return [line.strip() for line in text.splitlines() if line.strip()]


def test_readme_quickstart_runs_the_ci_test_command() -> None:
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  shown = _commands(quickstart.split("```bash", 1)[1].split("```", 1)[0])
  ci = _commands((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
  ci_pytest = [line for line in ci if shlex.split(line)[:3] == ["python", "-m", "pytest"]]
  assert ci_pytest, "no `python -m pytest` line in .ci/run"
  shown_pytest = [part.strip() for line in shown for part in line.split("&&")]
  assert set(ci_pytest) <= set(shown_pytest), (ci_pytest, shown)


def test_api_reference_reads_rest_tables_as_markdown() -> None:
  pytest.importorskip("griffe")
  sys.path.insert(0, str(ROOT / "docs"))
  try:
    import griffe_sphinx_roles
  finally:
    sys.path.remove(str(ROOT / "docs"))
  text = (
    "Intro.\n\n====  =====  ====\nname  axes   t\n====  =====  ====\n"
    "a     None   one\n             more\nb     given  two\n====  =====  ====\n\nAfter."
  )
  assert griffe_sphinx_roles._markdown_tables(text).split("\n") == [
    "Intro.",
    "",
    "| name | axes | t |",
    "| --- | --- | --- |",
    "| a | None | one more |",
    "| b | given | two |",
    "",
    "After.",
  ]
