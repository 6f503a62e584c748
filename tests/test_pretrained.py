"""transformers folders in and out: ``mergec merge A_DIR B_DIR --calibration corpus.txt -o
OUT`` writes a folder that ``AutoModel.from_pretrained`` loads, and ``MergeResult.into``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mergec
from mergec.cli import main

transformers = pytest.importorskip("transformers")

WORDS = "the a cat dog sat on mat ran far fast slow red blue green big small".split()


def _config(hidden: int = 16) -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=5 + len(WORDS), hidden_size=hidden,
                                   num_hidden_layers=2, num_attention_heads=hidden // 8,
                                   intermediate_size=2 * hidden, max_position_embeddings=64)


def _folder(path: Path, model: torch.nn.Module) -> Path:
    (path.parent / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                      "[MASK]", *WORDS]))
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(path.parent / "vocab.txt"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _corpus(path: Path) -> Path:
    """120 lines of 12 random words."""
    generator = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,),
                                                      generator=generator)) for _ in range(120)]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    torch.manual_seed(0)
    model = transformers.BertModel(_config()).eval()
    twin = mergec.permute(model, torch.randint(0, 20, (2, 12)))
    _corpus(tmp_path / "corpus.txt")
    return (_folder(tmp_path / "a", model), _folder(tmp_path / "b", twin),
            tmp_path / "corpus.txt")


def test_two_folders_merge_into_a_folder_transformers_loads(folders, tmp_path: Path) -> None:
    folder_a, folder_b, corpus = folders
    code = main(["merge", str(folder_a), str(folder_b), "--calibration", str(corpus),
                 "--tokens", "16", "--batch-size", "32", "--method", "permute", "--quiet",
                 "-o", str(tmp_path / "merged")])
    assert code == 0
    merged = transformers.AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    model_a = transformers.AutoModel.from_pretrained(str(folder_a)).eval()
    inputs = tokenizer(["the cat sat on the mat", "a big red dog ran far"], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        got, want = merged(**inputs), model_a(**inputs)
    assert type(got) is type(want)  # a ModelOutput, as model A returns
    # A merged with a permuted twin of itself is A again
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=1e-4,
                               atol=1e-4)
    report = json.loads((tmp_path / "merged" / "mergec_report.json").read_text())
    assert report["method"] == "permute" and report["inputs"]["sha256"]["model_a"]


def test_backbones_permuted_along_their_hidden_states_merge_back(tmp_path: Path,
                                                                   capsys) -> None:
    """B is A with every space permuted, the hidden states' too. The default merge (zip)
    matches the stream and maps it back into A's basis at the output: the folder it writes
    is A's architecture and computes A. ``--outputs both`` returns both bases, which A's
    architecture cannot hold: mergec's format, and the CLI says so."""
    torch.manual_seed(0)
    model = transformers.BertModel(_config()).eval()
    ids = torch.randint(5, 20, (2, 12))
    twin = mergec.permute(model, ids, spec=mergec.discover(model, ids, outputs="free"))
    _corpus(tmp_path / "corpus.txt")
    folder_a, folder_b = _folder(tmp_path / "a", model), _folder(tmp_path / "b", twin)
    arguments = ["merge", str(folder_a), str(folder_b), "--calibration",
                 str(tmp_path / "corpus.txt"), "--tokens", "16", "--batch-size", "32", "--quiet"]
    assert main([*arguments, "-o", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        assert not torch.allclose(twin(ids).last_hidden_state, model(ids).last_hidden_state)
        torch.testing.assert_close(merged(ids).last_hidden_state, model(ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert main([*arguments, "--outputs", "both", "-o", str(tmp_path / "both")]) == 0
    assert "saving in mergec's format instead" in capsys.readouterr().out
    window = torch.randint(5, 20, (2, 16))  # the traced windows' length (--tokens)
    with torch.no_grad():  # saved code returns the flat outputs: A's two, then B's two
        flat = mergec.load(tmp_path / "both")(window)
        torch.testing.assert_close(flat[0], model(window).last_hidden_state, rtol=1e-4,
                                   atol=1e-4)
        torch.testing.assert_close(flat[2], twin(window).last_hidden_state, rtol=1e-4,
                                   atol=1e-4)


def test_into_gives_model_a_with_the_merged_weights() -> None:
    torch.manual_seed(0)
    model_a, model_b = (transformers.BertModel(_config()).eval() for _ in range(2))
    x = torch.randint(0, 20, (16, 12))
    result = mergec.merge(model_a, model_b, x[:2], [(x,)], progress=False)
    model = result.into(model_a)
    assert type(model) is type(model_a) and model is not model_a
    with torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state,
                                   result.module(x).last_hidden_state)


def test_into_refuses_a_model_of_other_widths() -> None:
    torch.manual_seed(0)
    model_a, model_b = (transformers.BertModel(_config(16)).eval() for _ in range(2))
    x = torch.randint(0, 20, (16, 12))
    result = mergec.merge(model_a, model_b, x[:2], [(x,)], method="average", progress=False)
    with pytest.raises(mergec.MergeError, match=r"do not fit BertModel .*\(21, 24\) in the model"):
        result.into(transformers.BertModel(_config(24)))


def test_a_folder_and_a_checkpoint_file_are_refused(folders, tmp_path: Path, capsys) -> None:
    folder_a, _, corpus = folders
    assert main(["merge", str(folder_a), str(corpus), "--calibration", str(corpus),
                 "-o", str(tmp_path / "out")]) == 1
    assert "both be checkpoint files or both transformers folders" in capsys.readouterr().err


def test_a_saved_merge_at_unchanged_widths_loads_into_the_models_class(tmp_path: Path) -> None:
    """weights.safetensors of a full merge is a state dict of model A's own class."""
    from safetensors.torch import load_file
    from torch import nn

    torch.manual_seed(0)

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()

    model_a, model_b = net(), net()
    x = torch.randn(32, 3, 8, 8)
    result = mergec.merge(model_a, model_b, x[:2], [(x,)], progress=False)
    result.save(tmp_path / "merged")
    fresh = net()
    fresh.load_state_dict(load_file(str(tmp_path / "merged" / "weights.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), result.module(x))


def test_vision_folders_merge_on_a_folder_of_images(tmp_path: Path) -> None:
    from PIL import Image

    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, image_size=16, patch_size=8)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16})
    twin = mergec.permute(model, torch.randn(2, 3, 16, 16))
    for name, net in (("a", model), ("b", twin)):
        net.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    (tmp_path / "images").mkdir()
    generator = torch.Generator().manual_seed(0)
    for index in range(24):
        pixels = torch.randint(0, 256, (20, 24, 3), generator=generator, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(tmp_path / "images" / f"{index:02d}.png")
    assert main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--calibration",
                 str(tmp_path / "images"), "--batch-size", "8", "--method", "permute",
                 "--quiet", "-o", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModel.from_pretrained(str(tmp_path / "merged")).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).last_hidden_state, model(x).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
    assert (tmp_path / "merged" / "preprocessor_config.json").is_file()
