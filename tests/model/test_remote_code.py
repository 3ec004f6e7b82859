"""Self-contained model folders (issue 27): every saved folder carries its modeling code and an ``auto_map``,
so that ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works in a Python without interbert."""

from __future__ import annotations

import ast
import difflib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import minilm_vocab
from test_modeling import batch, small_config

from interbert.loading import load_model
from interbert.modeling import InterBertForPreTraining
from interbert.remote_code import FILES, GenerationError, _made_relative, model_code, source_path

LONG_TEXT = "a dog runs across the green field " * 20  # far beyond the model's 32 positions
TEXTS = ["a red ball on the grass", LONG_TEXT, "two cats"]

# Run by a fresh venv's python, where interbert is not installed: load the folder the way a transformers user
# does, and write what it computes for the test to compare.
IN_FRESH_VENV = """
import json, sys
import torch
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoTokenizer

folder, inputs_file, out_file, resaved = sys.argv[1:5]
try:
    import interbert
    found = interbert.__file__
except ImportError:
    found = None
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForPreTraining.from_pretrained(folder, trust_remote_code=True).eval()
encoder = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
regions = torch.load(inputs_file)
texts = json.load(open(inputs_file + ".json"))
text = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], **regions)
    outputs = {"itm_logits": out.itm_logits, "msm_logits": out.msm_logits, "text_sequence": out.text_sequence,
               "image_pooled": out.image_pooled,
               "encoder_text_pooled": encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                              **regions).text_pooled,
               "text_features": model.get_text_features(text["input_ids"], text["attention_mask"]),
               "image_features": model.get_image_features(**regions)}
model.save_pretrained(resaved)  # a folder saved from the folder's own code loads the same way
again = AutoModelForPreTraining.from_pretrained(resaved, trust_remote_code=True).eval()
with torch.no_grad():
    outputs["resaved_itm_logits"] = again(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                          **regions).itm_logits
outputs["input_ids"] = text["input_ids"]
torch.save(outputs, out_file)
from transformers.dynamic_module_utils import get_class_from_dynamic_module  # the model card's way to the scorer

scorer = get_class_from_dynamic_module("modeling_interbert.InterBertForImageTextRetrieval", folder)
json.dump({"interbert": found, "scorer": scorer.__name__, "config_class": type(config).__module__ + "." + type(config).__name__,
           "model_class": type(model).__module__ + "." + type(model).__name__,
           "model_max_length": tokenizer.model_max_length}, open(out_file + ".json", "w"))
"""


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A pretraining folder as a recipe writes it: the weights (save_pretrained), then the processor's files
    (the tokenizer with model_max_length = the model's 32 positions)."""
    from interbert.data.tokenize import load_tokenizer
    from interbert.processing import save_processor

    torch.manual_seed(0)
    model = InterBertForPreTraining(small_config(vocab_size=30522, embedding_size=8)).eval()
    folder = tmp_path_factory.mktemp("remote") / "model"
    model.save_pretrained(folder)
    save_processor(folder, load_tokenizer(minilm_vocab()), model.config)
    return folder


def fresh_venv(root: Path) -> Path:
    """A venv without interbert that still has torch and transformers: a .pth file lists this venv's
    site-packages as a plain path, and a plain path's own .pth files (interbert's editable install) are not
    processed. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "outer_site_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def test_a_saved_folder_loads_without_interbert_and_computes_what_load_model_does(saved_folder, tmp_path):
    from interbert.processing import InterBertProcessor

    python = fresh_venv(tmp_path / "venv")
    regions = {key: value for key, value in batch(b=3, r=5).items() if key.startswith("region_")}
    torch.save(regions, tmp_path / "inputs.pt")
    (tmp_path / "inputs.pt.json").write_text(json.dumps(TEXTS))
    (tmp_path / "probe.py").write_text(IN_FRESH_VENV)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([str(python), "probe.py", str(saved_folder), "inputs.pt", "out.pt", str(tmp_path / "resaved")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads((tmp_path / "out.pt.json").read_text())
    assert facts["interbert"] is None  # the venv really has no interbert
    assert facts["config_class"].startswith("transformers_modules.") and facts["config_class"].endswith(".InterBertConfig")
    assert facts["model_class"].endswith("modeling_interbert.InterBertForPreTraining")
    assert facts["model_max_length"] == 32 and facts["scorer"] == "InterBertForImageTextRetrieval"
    got = torch.load(tmp_path / "out.pt")
    assert got["input_ids"].shape[1] == 32  # truncation=True stops at the model's positions

    processor = InterBertProcessor.from_pretrained(saved_folder)
    text = processor(text=TEXTS)
    assert torch.equal(text["input_ids"], got["input_ids"])  # the same tokens as interbert's own processor
    model = load_model(saved_folder).eval()
    inputs = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"], **regions}
    with torch.no_grad():
        want = model(**inputs)
        expected = {"itm_logits": want.itm_logits, "msm_logits": want.msm_logits, "text_sequence": want.text_sequence,
                    "image_pooled": want.image_pooled, "encoder_text_pooled": want.text_pooled,
                    "text_features": model.get_text_features(text["input_ids"], text["attention_mask"]),
                    "image_features": model.get_image_features(**regions), "resaved_itm_logits": want.itm_logits}
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


def test_every_saved_folder_holds_the_code_and_the_auto_map_of_the_packages_registrations(saved_folder):
    from transformers import AutoConfig, AutoModel
    from transformers.dynamic_module_utils import get_imports
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MULTIPLE_CHOICE_MAPPING,
        MODEL_FOR_PRETRAINING_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    from interbert.config import InterBertConfig

    files, auto_map = model_code()
    for name, text in files.items():
        assert (saved_folder / name).read_text(encoding="utf-8") == text  # the package's code as it is now
        assert "interbert" not in get_imports(saved_folder / name), name  # what transformers' import check reads
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["auto_map"] == auto_map
    local = {"AutoConfig": type(AutoConfig.for_model("interbert")), "AutoModel": AutoModel._model_mapping[InterBertConfig],
             "AutoModelForPreTraining": MODEL_FOR_PRETRAINING_MAPPING[InterBertConfig],
             "AutoModelForSequenceClassification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[InterBertConfig],
             "AutoModelForMultipleChoice": MODEL_FOR_MULTIPLE_CHOICE_MAPPING[InterBertConfig]}
    assert {auto: target.split(".")[-1] for auto, target in auto_map.items()} == {a: c.__name__ for a, c in local.items()}


@pytest.mark.parametrize("name", [name for name, source in FILES.items() if not source.names])
def test_a_folder_file_is_its_module_with_only_the_imports_and_registrations_changed(name):
    """The files stay in sync with the package: each is its module's text but for the lines that import
    interbert (now relative) and the Auto registrations (now the auto_map); nothing is kept by hand."""
    files, _ = model_code()
    source = source_path(FILES[name].module).read_text(encoding="utf-8").splitlines()
    generated = files[name].splitlines()
    changed = [line for line in difflib.ndiff(source, generated) if line[:2] in ("- ", "+ ")]
    for line in changed:
        text = line[2:].strip()
        if line.startswith("+ "):
            assert text.startswith(("from .", "# Generated from", "# AutoModel.from_pretrained(folder")), line
        else:
            assert text.startswith(("from interbert.", "#")) or ".register(" in text, line
    defined = [[node.name for node in ast.parse(text).body if isinstance(node, (ast.ClassDef, ast.FunctionDef))]
               for text in ("\n".join(source), files[name])]
    assert defined[0] == defined[1]  # every class and function of the module, none of them changed above


def test_a_module_that_cannot_become_a_folder_file_is_refused_by_name():
    with pytest.raises(GenerationError, match=r"modeling\.py:2 imports from interbert\.serve"):
        _made_relative("import torch\nfrom interbert.serve import DEFAULT_MAX_REGIONS\n", "modeling.py")
    with pytest.raises(GenerationError, match=r"modeling\.py:1: write `from interbert.x import name`"):
        _made_relative("import interbert.config\n", "modeling.py")
    with pytest.raises(GenerationError, match=r"holds only in_batch_itm_pairs"):
        _made_relative("from interbert.data.negatives import tfidf_hard_negatives\n", "objectives.py")

