"""Checkpoints rebuild the model from the file alone, reject bad or unsafe files with a UserError, and save atomically."""

from __future__ import annotations

import pathlib
import pickle

import pytest
import torch

from bayesian_sparse_transformer import BayesianSparseTransformer, HeadConfig, ModelConfig
from checkpoints import load_checkpoint, load_pretrained_encoder, save_checkpoint
from performer_pytorch import PerformerConfig
from utils import UserError, package_versions

GENES = [f"GENE{i}" for i in range(15)]
CLASSES = ["B cell", "T cell", "monocyte"]
SEQ_LEN = len(GENES) + 1


def pruned_bayesian_model() -> BayesianSparseTransformer:
    """A Bayesian model whose fc1 inputs and hidden1 were physically pruned (so it has an input_index)."""
    torch.manual_seed(0)
    encoder = PerformerConfig(
        num_tokens=7, max_seq_len=SEQ_LEN, dim=16, depth=1, heads=2, dim_head=8, nb_features=16,
        feature_redraw_interval=5,
    )
    head = HeadConfig(
        seq_len=SEQ_LEN, dim=16, num_classes=len(CLASSES), hidden1=12, hidden2=8, bayes=True, init_log_sigma=-2.0
    )
    model = BayesianSparseTransformer(ModelConfig(encoder=encoder, head=head))
    model.prune(0.25, dim=1, mode="physical")
    return model.eval()


def random_tokens(batch: int = 4) -> torch.Tensor:
    return torch.randint(0, 7, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(0))  # (batch, genes+1)


def save(path: pathlib.Path, model: BayesianSparseTransformer, **overrides) -> None:
    metadata = dict(
        genes=GENES, classes=CLASSES, bin_num=5, stage="B", args={"lr": 1e-4}, metrics={"val_accuracy": 0.9},
        training_state={"epoch": 3},
    )
    save_checkpoint(path, model, **{**metadata, **overrides})


def test_pruned_bayesian_model_round_trips_without_architecture_flags(tmp_path):
    model = pruned_bayesian_model()
    assert model.head.input_index is not None
    path = tmp_path / "model.pth"
    save(path, model)
    loaded = load_checkpoint(path)
    rebuilt = loaded.model.eval()
    assert rebuilt.config.to_dict() == model.config.to_dict()
    assert torch.equal(rebuilt.head.input_index, model.head.input_index)
    assert loaded.genes == GENES and loaded.classes == CLASSES
    assert (loaded.bin_num, loaded.stage) == (5, "B")
    assert loaded.args == {"lr": 1e-4} and loaded.metrics == {"val_accuracy": 0.9}
    assert loaded.training_state == {"epoch": 3}
    assert loaded.versions == package_versions() and "torch" in loaded.versions

    tokens = random_tokens()
    with torch.no_grad():
        for m in (model, rebuilt):
            m.set_deterministic(True)
        assert torch.equal(rebuilt(tokens), model(tokens))
        for m in (model, rebuilt):
            m.set_deterministic(False)
        original = model.mc_logits(tokens, 5, generator=torch.Generator().manual_seed(3))
        again = rebuilt.mc_logits(tokens, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, original)


def test_mask_pruned_deterministic_model_round_trips(tmp_path):
    torch.manual_seed(0)
    encoder = PerformerConfig(num_tokens=7, max_seq_len=SEQ_LEN, dim=16, depth=1, heads=2, dim_head=8, nb_features=16)
    head = HeadConfig(seq_len=SEQ_LEN, dim=16, num_classes=len(CLASSES), hidden1=12, hidden2=8)
    model = BayesianSparseTransformer(ModelConfig(encoder=encoder, head=head)).eval()
    model.prune(0.5, dim=0, mode="mask")
    stats = model.pruning_stats()
    save(tmp_path / "stage_a.pth", model, stage="A")
    rebuilt = load_checkpoint(tmp_path / "stage_a.pth").model.eval()
    assert not rebuilt.is_bayesian
    assert rebuilt.pruning_stats() == stats
    tokens = random_tokens()
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens), model(tokens))


def test_own_checkpoint_initialises_a_new_model_encoder(tmp_path):
    source = pruned_bayesian_model()
    save(tmp_path / "stage_a.pth", source)
    torch.manual_seed(1)
    config = ModelConfig(
        encoder=PerformerConfig(**source.config.to_dict()["encoder"]),
        head=HeadConfig(seq_len=SEQ_LEN, dim=16, num_classes=2, hidden1=12, hidden2=8),
    )
    target = BayesianSparseTransformer(config).eval()
    notes = load_pretrained_encoder(target, tmp_path / "stage_a.pth")
    assert any("head starts fresh" in note for note in notes)
    tokens = random_tokens()
    with torch.no_grad():
        assert torch.equal(target.encode(tokens), source.encode(tokens))


def test_checkpoint_of_a_ddp_wrapped_model_saves_the_inner_model(tmp_path):
    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel, which exposes `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = pruned_bayesian_model()
    save(tmp_path / "ddp.pth", Wrapper(model))
    rebuilt = load_checkpoint(tmp_path / "ddp.pth").model
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "model.pth"
    save(path, pruned_bayesian_model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"these are not weights\n",
        b"gene,count\nCD3E,1\n",
        b"\x89HDF\r\n\x1a\n" + bytes(64),
        b"PK\x03\x04" + bytes(64),
    ],
    ids=["empty", "text", "csv", "h5ad", "zip"],
)
def test_file_of_another_type_is_a_user_error(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_foreign_dictionary_is_a_user_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"a": 1}, path)
    with pytest.raises(UserError, match="not a checkpoint of this project"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="neither a checkpoint of this project nor a scBERT"):
        load_pretrained_encoder(pruned_bayesian_model(), path)


def test_non_dictionary_payload_is_a_user_error(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match="not a checkpoint dictionary"):
        load_checkpoint(path)


def test_scbert_checkpoint_given_as_model_points_to_finetuning(tmp_path):
    path = tmp_path / "panglao_pretrain.pth"
    torch.save({"model_state_dict": {"performer.net.layers.0.0.fn.to_q.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(UserError, match="looks like a scBERT checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nowhere.pth")


def test_damaged_state_dict_is_a_user_error(tmp_path):
    path = tmp_path / "model.pth"
    save(path, pruned_bayesian_model())
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["head.fc3.weight"]
    torch.save(payload, path)
    with pytest.raises(UserError, match="damaged or built for another architecture"):
        load_checkpoint(path)


def test_a_checkpoint_of_an_earlier_version_is_refused_with_a_call_to_retrain(tmp_path):
    path = tmp_path / "model.pth"
    save(path, pruned_bayesian_model())
    payload = torch.load(path, weights_only=True)
    del payload["bin_width"]  # as written before --bin_width existed
    torch.save(payload, path)
    with pytest.raises(UserError, match=r"earlier version of this project \(it lacks bin_width\); retrain"):
        load_checkpoint(path)


class TouchOnUnpickle:
    """A pickle payload that would create a file when unpickled: stands in for arbitrary code in a checkpoint."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_checkpoint_carrying_code_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    payload = {"format": "bayesian-sparse-transformer/1", "state_dict": TouchOnUnpickle(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="refusing to load"):
        load_pretrained_encoder(pruned_bayesian_model(), path)
    assert not marker.exists()


def test_failed_save_keeps_the_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    model = pruned_bayesian_model()
    save(path, model, stage="A")
    before = path.read_bytes()

    def torn_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save(path, model, stage="B")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]
    assert load_checkpoint(path).stage == "A"
