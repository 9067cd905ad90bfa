"""parambounds.transformers.BoundsCallback with a real Hugging Face Trainer (a tiny BERT
built from a config: no downloads), and bake_ through save_pretrained/from_pretrained."""

import glob
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from parambounds import Bounds, BoundsError  # noqa: E402
from parambounds.transformers import BoundsCallback  # noqa: E402

SPEC = {"*.LayerNorm.weight": (0.9, 1.1), "classifier.weight": (-0.05, 0.05)}


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


class Data(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Inside(TrainerCallback):
    """After ours in the list: records, after each optimizer step, whether all is inside."""

    def __init__(self):
        self.after_step = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ARG002
        self.after_step.append(Bounds(SPEC).report(model).ok)


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_without_the_callback_training_leaves_the_bounds(tmp_path):
    model = tiny_bert()
    Trainer(model=model, args=args(tmp_path), train_dataset=Data()).train()
    assert not Bounds(SPEC).report(model).ok


def test_every_step_ends_inside_and_metrics_are_in_the_logs(tmp_path):
    model = tiny_bert()
    inside = Inside()
    cb = BoundsCallback(Bounds(SPEC))
    trainer = Trainer(
        model=model, args=args(tmp_path), train_dataset=Data(), callbacks=[cb, inside]
    )
    trainer.train()
    assert inside.after_step == [True] * 4 and cb.steps == 4
    Bounds(SPEC).check(model)
    logged = [h for h in trainer.state.log_history if "bounds/outside" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4]
    assert all(h["bounds/outside"] == 0 for h in logged)
    assert "bounds/classifier.weight/excess" in logged[0]


def test_metrics_are_numbers_and_match_the_report_without_projection(tmp_path):
    model = tiny_bert()
    bounds = Bounds(SPEC)
    trainer = Trainer(
        model=model,
        args=args(tmp_path),
        train_dataset=Data(),
        callbacks=[BoundsCallback(bounds, project=False)],
    )
    trainer.train()
    last = [h for h in trainer.state.log_history if "bounds/outside" in h][-1]
    report = bounds.report(model)
    assert last["bounds/outside"] == sum(e.below + e.above + e.nan for e in report.entries) > 0
    assert isinstance(last["bounds/penalty"], float)


def test_tensorboard_writes_the_metrics_when_the_callback_comes_first(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = tiny_bert()
    trainer = Trainer(
        model=model,
        args=args(tmp_path, report_to=["tensorboard"]),
        train_dataset=Data(),
    )
    BoundsCallback(Bounds(SPEC)).add_to(trainer)
    trainer.train()
    (events,) = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(events)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/bounds/outside" in tags, tags
    assert [e.step for e in acc.Scalars("train/bounds/outside")] == [1, 2, 3, 4]
    assert all(e.value == 0 for e in acc.Scalars("train/bounds/outside"))


def test_gradient_accumulation_projects_on_real_steps_only(tmp_path):
    model = tiny_bert()
    inside = Inside()
    cb = BoundsCallback(Bounds(SPEC))
    Trainer(
        model=model,
        args=args(tmp_path, max_steps=3, gradient_accumulation_steps=2),
        train_dataset=Data(),
        callbacks=[cb, inside],
    ).train()
    assert cb.steps == 3 and inside.after_step == [True] * 3


def test_bf16_on_the_cpu(tmp_path):
    model = tiny_bert()
    cb = BoundsCallback(Bounds(SPEC))
    Trainer(
        model=model, args=args(tmp_path, bf16=True), train_dataset=Data(), callbacks=[cb]
    ).train()
    assert cb.steps == 4
    Bounds(SPEC).check(model)


def test_a_step_the_scaler_skipped_is_not_projected():
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight.fill_(1.0)
    cb = BoundsCallback(Bounds(SPEC))
    state = SimpleNamespace(log_history=[], global_step=0)
    skipped = SimpleNamespace(step_was_skipped=True)  # as accelerate's AcceleratedOptimizer
    cb.on_optimizer_step(None, state, None, model=model, optimizer=skipped)
    assert cb.steps == 0 and bool((model.classifier.weight == 1.0).all())
    ran = SimpleNamespace(step_was_skipped=False)
    cb.on_optimizer_step(None, state, None, model=model, optimizer=ran)
    w = model.classifier.weight.detach().double()
    assert cb.steps == 1 and bool((w <= 0.05).all()) and bool((w > 0.0499).all())


def test_an_optimizer_without_bounded_parameters_is_refused(tmp_path):
    model = tiny_bert()
    for name, p in model.named_parameters():
        if "LayerNorm.weight" in name or name == "classifier.weight":
            p.requires_grad_(False)  # the Trainer's optimizer leaves them out
    trainer = Trainer(
        model=model,
        args=args(tmp_path),
        train_dataset=Data(),
        callbacks=[BoundsCallback(Bounds(SPEC))],
    )
    with pytest.raises(
        BoundsError, match=r"the Trainer's optimizer holds none of the bounded parameters \('bert\."
    ):
        trainer.train()


def test_bad_bounds():
    with pytest.raises(BoundsError, match="bounds must be a parambounds.Bounds, got dict"):
        BoundsCallback(SPEC)


def test_bake_round_trips_through_save_pretrained(tmp_path):
    model = tiny_bert()
    bounds = Bounds(SPEC)
    bounds.reparametrize_(model)
    Trainer(
        model=model,
        args=args(tmp_path),
        train_dataset=Data(),
        callbacks=[BoundsCallback(bounds)],  # a check that passes: values are computed
    ).train()
    names = [n for n, _ in tiny_bert().named_parameters() if n in bounds.bounds_of(model)[0]]
    names = [n for n in names if bounds.bounds_of(model)[0][n] is not None]
    trained = {n: model.get_submodule(n.rpartition(".")[0]).weight.detach().clone() for n in names}
    assert any(
        not torch.equal(v, torch.ones_like(v)) for n, v in trained.items() if "LayerNorm" in n
    )
    bounds.bake_(model)
    model.save_pretrained(tmp_path / "saved")
    loaded, info = BertForSequenceClassification.from_pretrained(
        tmp_path / "saved", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for n, v in trained.items():
        assert torch.equal(loaded.get_parameter(n).detach(), v), n
    assert set(loaded.state_dict()) == set(tiny_bert().state_dict())


def test_tied_weights_are_projected_once_and_both_names_see_it(tmp_path):
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = BertForMaskedLM(config)
    decoder = model.cls.predictions.decoder.weight
    assert decoder is model.bert.embeddings.word_embeddings.weight  # tied

    class MLM(Data):
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    bounds = Bounds({"bert.embeddings.word_embeddings.weight": (-0.01, 0.01)})
    cb = BoundsCallback(bounds)
    Trainer(
        model=model, args=args(tmp_path, max_steps=2), train_dataset=MLM(), callbacks=[cb]
    ).train()
    assert cb.steps == 2
    assert float(decoder.detach().abs().max()) <= 0.01
    bounds.check(model)
