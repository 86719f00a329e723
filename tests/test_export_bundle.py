"""An exported folder loads with transformers alone: its own copy of the attention code, no linearize installed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import randomise_new_parameters, tiny_model, tiny_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

import linearize
from linearize import AttentionConfig, convert
from linearize.models import bundle
from linearize.models.hf import LinearizedModelMixin

PROMPT = [[5, 6, 7, 8, 9], [9, 3, 3, 4, 5]]
NEW_TOKENS = 6
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Every kind that replaces attention travels in the copy; the folder of the first is also saved again and loaded as a
# Hub repo.
KINDS = ["lolcats", *sorted(k for k, v in linearize.ATTENTION_KINDS.items() if v.build is not None and k != "lolcats")]
# Settings beyond the kind's own, travelling in config.json: `<kind>+<variant>` entries of KINDS.
VARIANTS = {
    "lolcats+sparse": dict(window=4, sparse_cache=2, sparse_block=2, sparse_scorer="learned"),
    "gdn+heads": dict(softmax_heads={"1": [0], "2": [0, 1]}, options={"conv_kernel": 4}),
    "lizard+heads": dict(softmax_heads={"0": [1], "3": [0]}),
}
KINDS += list(VARIANTS)

# Runs in a fresh interpreter where `linearize` (and, for the Hub-style load, `triton`) cannot be imported.
CHILD = r"""
import importlib.abc, json, sys
from pathlib import Path

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("linearize", "triton"):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Block())
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

repo, out, prompt, new, folders = sys.argv[1], Path(sys.argv[2]), *map(json.loads, sys.argv[3:])
ids = torch.tensor(prompt)
first = folders[0]
results = {}

def load(where):
    model = AutoModelForCausalLM.from_pretrained(where, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    return model

with torch.no_grad():
    # The Hub-style load first, in a process that has registered nothing yet: it checks the imports of every file.
    from_hub = load(repo)
    results["hub"] = from_hub(ids, use_cache=False).logits
    for n, folder in enumerate(folders):
        model = load(folder)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        results[f"{n}.logits"] = model(ids, use_cache=False).logits
        results[f"{n}.sequences"] = gen.sequences
        results[f"{n}.scores"] = torch.stack(gen.scores, 1)
        results[f"{n}.full"] = model(gen.sequences, use_cache=False).logits
    # Its auto_map names the repo (`local/tiny--modeling_linearize...`); the saved folder must name its own files.
    from_hub.save_pretrained(out / "resaved")
    results["resaved"] = load(out / "resaved")(ids, use_cache=False).logits
tok = AutoTokenizer.from_pretrained(first, trust_remote_code=True)
config = AutoConfig.from_pretrained(first, trust_remote_code=True)
save_file(results, out / "child.safetensors")
print(json.dumps({"linearize": sorted(m for m in sys.modules if m.split(".")[0] == "linearize"),
                  "config": type(config).__name__, "tokens": tok("the of").input_ids}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`{kind: (model, folder)}`: a tiny Llama converted to each kind and saved (the first with a tokenizer)."""
    out = {}
    for kind in KINDS:
        model = tiny_model("llama")
        settings = dict(window=3, feature_dim=8) | VARIANTS.get(kind, {})
        convert(model, AttentionConfig(kind=kind.split("+")[0], **settings))
        randomise_new_parameters(model)
        folder = tmp_path_factory.mktemp("export") / f"tiny-{kind}"
        model.save_pretrained(folder)
        out[kind] = model, folder
    tiny_tokenizer().save_pretrained(out[KINDS[0]][1])
    return out


def _hub_cache(folder: Path, cache: Path) -> str:
    """Lay `folder` out as a downloaded Hub repo `local/tiny` (offline), so transformers loads it file by file."""
    repo = cache / "models--local--tiny"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return "local/tiny"


def test_loads_without_linearize(exported, tmp_path):
    ids = torch.tensor(PROMPT)
    model, folder = exported[KINDS[0]]
    with torch.no_grad():
        expected = [m(ids, use_cache=False).logits for m, _ in exported.values()]
    repo = _hub_cache(folder, tmp_path / "hub")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    folders = json.dumps([str(f) for _, f in exported.values()])
    args = [repo, str(tmp_path), json.dumps(PROMPT), str(NEW_TOKENS), folders]
    run = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"linearize": [], "config": "LinearizedLlamaConfig", "tokens": [4, 5]}

    from safetensors.torch import load_file

    child = load_file(tmp_path / "child.safetensors")
    n = len(PROMPT[0])
    for i, kind in enumerate(KINDS):
        where = lambda text, kind=kind: f"{kind}: {text}"  # noqa: E731
        torch.testing.assert_close(child[f"{i}.logits"], expected[i], rtol=0, atol=1e-6, msg=where)
        # Greedy generation with the recurrent cache gives what the full forward over the same tokens gives.
        full = child[f"{i}.full"][:, n - 1 : -1]
        torch.testing.assert_close(child[f"{i}.scores"], full, rtol=1e-4, atol=1e-5, msg=where)
        assert torch.equal(child[f"{i}.sequences"][:, n:], full.argmax(-1)), kind
    torch.testing.assert_close(child["hub"], expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(child["resaved"], expected[0], rtol=0, atol=1e-6)
    # What a remote-code load saved loads in the package too.
    resaved = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    with torch.no_grad():
        torch.testing.assert_close(resaved(ids, use_cache=False).logits, expected[0], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["auto_map"] == model.config.auto_map
    code = {p.name: p.read_bytes() for p in folder.glob("*.py")}
    assert {p.name: p.read_bytes() for p in (tmp_path / "resaved").glob("*.py")} == code


GPU_CHILD = r"""
import importlib.abc, json, os, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "linearize":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).cuda().eval()
ids = torch.tensor(json.loads(sys.argv[2])).cuda()
with torch.no_grad():
    triton = model(ids, use_cache=False).logits
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0,
                         output_scores=True, return_dict_in_generate=True)
    full = model(gen.sequences, use_cache=False).logits[:, ids.shape[1] - 1 : -1]
    os.environ["LINEARIZE_KERNELS"] = "torch"
    torch_path = model(ids, use_cache=False).logits
kernels = sorted(m.rpartition(".")[2] for m in sys.modules if ".linearize.kernels.hybrid.triton_" in m)
print(json.dumps({"kernels": kernels, "vs_torch": (triton - torch_path).abs().max().item(),
                  "gen_vs_full": (torch.stack(gen.scores, 1) - full).abs().max().item()}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_copy_runs_the_triton_kernels_on_gpu(exported, tmp_path):
    _, folder = exported[KINDS[0]]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LINEARIZE_KERNELS")}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    run = subprocess.run(
        [sys.executable, "-c", GPU_CHILD, str(folder), json.dumps(PROMPT)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"triton_chunk", "triton_recurrent"} <= set(report["kernels"]), report
    # Loose enough for the kernels' float32 arithmetic order, far below what a wrong kernel gives (order 1).
    assert report["vs_torch"] < 2e-3 and report["gen_vs_full"] < 2e-3, report


def test_with_linearize_imported_its_classes_are_used_and_save_again(exported, tmp_path):
    model, folder = exported[KINDS[0]]
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(loaded) is type(model) and isinstance(loaded, LinearizedModelMixin)
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)) is type(model.config)
    loaded.save_pretrained(tmp_path / "again")
    code = {p.name: p.read_bytes() for p in folder.glob("*.py")}
    assert {p.name: p.read_bytes() for p in (tmp_path / "again").glob("*.py")} == code
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True).eval()
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_bundle_is_small_and_transformers_finds_every_file(exported):
    _, folder = exported[KINDS[0]]
    names = {p.name for p in folder.glob("*.py")}
    files = {rel for rel in bundle.collect(Path(linearize.__file__).parent)}
    assert {"models/hf.py", "models/bundle.py", "attention/__init__.py", "kernels/hybrid/torch_chunked.py"} <= files
    assert not [rel for rel in files if rel.split("/")[0] in ("train", "eval", "data", "cli.py", "hub.py")], files
    # Every module of a package whose __init__ is needed comes along (it may list its own folder).
    attention = Path(linearize.__file__).parent / "attention"
    assert {f"attention/{p.name}" for p in attention.glob("*.py")} <= files
    assert names == {bundle.MODELING_FILE} | {bundle.flat_name(rel) for rel in files} == set(bundle.code_files(folder))
    found = {Path(f).name for f in get_relative_import_files(folder / bundle.MODELING_FILE)}
    assert found == names - {bundle.MODELING_FILE}
    # What loading from the Hub checks in each file it fetches: nothing beyond torch, transformers and the stdlib.
    needed = set().union(*(get_imports(folder / name) for name in names))
    assert needed - sys.stdlib_module_names <= {"torch", "transformers", "huggingface_hub", "yaml"}, needed


def test_push_sends_the_code_the_modeling_file_loads_and_no_other(exported, tmp_path):
    from linearize.hub import files_to_upload

    folder = shutil.copytree(exported[KINDS[0]][1], tmp_path / "folder")
    (folder / "linearize_from_an_older_export.py").write_text("")
    sent = {p.name for p in files_to_upload(folder) if p.suffix == ".py"}
    assert sent == set(bundle.code_files(folder)) and len(sent) > 10
    assert bundle.code_problem(folder) is None
    (folder / bundle.flat_name("attention/cache.py")).unlink()
    assert bundle.code_problem(folder) == "lacks linearize_attention_cache.py, which modeling_linearize.py loads"


def test_rewrite_keeps_the_code_and_hides_it_from_transformers():
    source = (
        b'"""Doc."""\nfrom . import x\nfrom .. import y\nfrom ..a.b import (\n    c,  # why\n    d,\n)\n'
        b"import triton\n\n\ndef f():\n    import triton.language as tl\n    from .k import g\n\n    return tl, g\n"
        b"try:\n    import fla\nexcept ImportError:\n    fla = None\n"
    )
    out = bundle.rewrite(source)
    assert b"from . import x\nfrom . . import y\nfrom .. a.b import (\n    c,  # why\n" in out
    assert b"try:\n    import triton\nexcept ImportError:\n    raise\n" in out
    assert b"    try:\n        import triton.language as tl\n    except ImportError:\n        raise\n" in out
    assert b"    from . k import g\n" in out and b"try:\n    import fla\nexcept ImportError:\n    fla = None" in out
    import ast

    assert ast.dump(ast.parse(out).body[1]) == ast.dump(ast.parse(source).body[1])
    assert bundle.rewrite(out) == out
    with pytest.raises(ValueError, match="as a file to fetch"):
        bundle.rewrite(b'"""\nfrom .example import x\n"""\n', "m.py")


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"models/bundle.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_collect_follows_imports_and_packages_that_list_their_folder(tmp_path):
    root = _package(
        tmp_path / "linearize",
        {
            "__init__.py": "from .train import run\n",
            "train.py": "",
            "models/hf.py": "from ..kinds import KINDS\n\ndef f():\n    from .. import ops\n",
            "ops.py": "",
            "kinds/__init__.py": "import pkgutil\nKINDS = [m.name for m in pkgutil.iter_modules(__path__)]\n",
            "kinds/new_kind.py": "from ..ops import *\n",
            "kinds/sub/__init__.py": "",
            "unused.py": "",
        },
    )
    assert bundle.collect(root) == [
        "kinds/__init__.py",
        "kinds/new_kind.py",
        "kinds/sub/__init__.py",
        "models/bundle.py",
        "models/hf.py",
        "ops.py",
    ]
    (root / "ops.py").write_text("from linearize.kinds import KINDS\n")
    with pytest.raises(ValueError, match="ops.py:1 imports linearize.kinds by its absolute name"):
        bundle.collect(root)
