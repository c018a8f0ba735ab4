"""Regression tests for training-layer bugs found by reading the code (issue 12), each failing before its fix."""

from __future__ import annotations

import itertools

import numpy as np
from test_training import TINY, data_path, one_torch_thread, train  # noqa: F401  (fixtures)

import finetune_sparse
import predict_updated
from performer_pytorch import PerformerConfig


def test_trainable_layers_beyond_the_depth_trains_every_block():
    from bayesian_sparse_transformer import BayesianSparseTransformer, HeadConfig, ModelConfig

    encoder = PerformerConfig(num_tokens=7, max_seq_len=11, dim=8, depth=6, heads=2, dim_head=4)
    model = BayesianSparseTransformer(ModelConfig(encoder, HeadConfig(seq_len=11, dim=8, num_classes=3, hidden1=8, hidden2=4)))
    finetune_sparse.freeze_encoder_layers(model, trainable_layers=8, pretrained=True)
    trains = [all(p.requires_grad for p in block.parameters()) for block in model.encoder.layers]
    assert trains == [True] * 6  # before the fix: a negative slice trained blocks 4-5 only
    assert not model.encoder.token_emb.weight.requires_grad


def test_local_reparam_with_several_training_samples_is_refused(data_path, tmp_path, capsys):  # noqa: F811
    argv = ["--data_path", str(data_path), *TINY, "--bayes_head", "--local_reparam", "--mc_samples", "2",
            "--epoch", "1", "--ckpt_dir", str(tmp_path / "out")]
    assert finetune_sparse.main(argv) == 2
    assert "--local_reparam" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bundled_data_records_the_label_column_it_really_used(tmp_path, capsys):
    """--label_key cell_type on the bundled data evaluates bulk_labels, and the outputs must say so."""
    from bayesian_sparse_transformer import BayesianSparseTransformer, HeadConfig, ModelConfig
    from checkpoints import save_checkpoint
    from utils import load_dataset

    data = load_dataset(None, label_key="cell_type")
    assert data.label_key == "bulk_labels"
    classes = sorted(set(data.labels))
    encoder = PerformerConfig(num_tokens=7, max_seq_len=len(data.genes) + 1, dim=8, depth=1, heads=1, dim_head=4)
    head = HeadConfig(seq_len=len(data.genes) + 1, dim=8, num_classes=len(classes), hidden1=8, hidden2=4)
    save_checkpoint(tmp_path / "m.pth", BayesianSparseTransformer(ModelConfig(encoder, head)), genes=data.genes,
                    classes=classes, bin_num=5, stage="A")
    out = tmp_path / "pred"
    argv = ["--model_path", str(tmp_path / "m.pth"), "--label_key", "cell_type", "--output_dir", str(out), "--bayes_mc_samples", "1"]
    assert predict_updated.main(argv) == 0
    import json

    assert json.loads((out / "run.json").read_text())["summary"]["label_key"] == "bulk_labels"
    assert "obs['bulk_labels']" in capsys.readouterr().out


def test_shuffle_seeds_never_repeat_across_folds_phases_levels_and_epochs():
    combos = list(itertools.product([2021], range(3), [False, True], range(5), range(150)))
    seeds = {finetune_sparse.shuffle_seed(*combo) for combo in combos}
    assert len(seeds) == len(combos)  # before: seed*1000 + fold*100 + epoch made fold 0 epoch 100 = fold 1 epoch 0


def test_options_a_continued_checkpoint_fixes_are_refused_when_they_differ(data_path, tmp_path, capsys):  # noqa: F811
    stage_a = train(data_path, tmp_path / "a", "a", "--epoch", "1", "--prune_target", "0")
    base = ["--data_path", str(data_path), *TINY, "--model_path", str(stage_a.best), "--epoch", "1",
            "--prune_target", "0", "--ckpt_dir", str(tmp_path / "b")]
    assert finetune_sparse.main([*base, "--dim", "64", "--dropout", "0.3"]) == 2
    err = capsys.readouterr().err
    assert "--dim 16" in err and "--dropout 0.0" in err and not (tmp_path / "b").exists()
    assert finetune_sparse.main([*base, "--feature_redraw_interval", "5", "--nb_features", "7"]) == 2
    err = capsys.readouterr().err  # the encoder's random features were silently the checkpoint's before
    assert "--feature_redraw_interval 1000" in err and "--nb_features (default)" in err and not (tmp_path / "b").exists()
    vectors = tmp_path / "vectors.npy"
    np.save(vectors, np.zeros((765, 16), dtype=np.float32))
    for extra, flag in ((["--gene2vec_path", str(vectors)], "--gene2vec_path"), (["--no_pos_embed"], "--no_pos_embed")):
        assert finetune_sparse.main([*base, *extra]) == 2  # the gene embedding was silently the checkpoint's before
        err = capsys.readouterr().err
        assert f"drop {flag}" in err and "gene embedding (learned)" in err and not (tmp_path / "b").exists()
    assert finetune_sparse.main(base) == 0  # repeating the checkpoint's own values (TINY's --dim 16) is fine
