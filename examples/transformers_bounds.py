"""Bounds in a Hugging Face Trainer, then bake_ before save_pretrained.

A tiny BERT built from a config (no downloads), trained for a few steps with its
LayerNorm scales kept in [0.8, 1.2] by reparametrization, baked back into plain
parameters and saved: from_pretrained gives the trained values back.

Run: python examples/transformers_bounds.py   (needs `pip install parambounds[transformers]`)
"""

import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from parambounds import Bounds
from parambounds.transformers import BoundsCallback

torch.set_num_threads(1)
torch.manual_seed(0)

config = BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
    num_labels=2,
)


class Data(torch.utils.data.Dataset):
    def __init__(self, n=64):
        self.ids = torch.randint(0, 100, (n, 12))
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


model = BertForSequenceClassification(config)
bounds = Bounds({"*.LayerNorm.weight": (0.8, 1.2), "classifier.weight": (-0.5, 0.5)})
layer_norms = Bounds({"*.LayerNorm.weight": (0.8, 1.2)})
layer_norms.reparametrize_(model)  # LayerNorm scales: reparametrized; the classifier: projected

with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(
        output_dir=out,
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        logging_steps=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data())
    BoundsCallback(bounds).add_to(trainer)
    trainer.train()
    last = [h for h in trainer.state.log_history if "bounds/outside" in h][-1]
    totals = {k: v for k, v in last.items() if k.startswith("bounds/") and k.count("/") == 1}
    print("logged bounds metrics:", totals)

    layer_norms.bake_(model)  # plain parameters again, under their original names
    model.save_pretrained(out + "/model")
    loaded, info = BertForSequenceClassification.from_pretrained(
        out + "/model", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    baked = model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in baked.items())
    print("save_pretrained / from_pretrained: all", len(baked), "tensors equal")
print(bounds.report(loaded).summary())
