"""Run by ``torchrun`` in test_train_ddp.py: train, then record what this rank saw and ended with.

Usage: ddp_train_worker.py STORE OUT RECORD_DIR
Writes RECORD_DIR/rank{R}.pt with the (epoch, sample) pairs this rank loaded and its final
weights (the DDP-wrapped model's module, as the rank holds it).
"""
import os
import sys

import torch

import student_train.trainer as trainer
from student_train import TrainConfig, train
from student_train import StoreDataset

store, out, record_dir = sys.argv[1:4]
seen, models = [], []
load_sample = StoreDataset.__getitem__


def recording_getitem(self, key):
    seen.append(tuple(key))
    return load_sample(self, key)


one_epoch = trainer.train_one_epoch


def capturing_epoch(model, *args, **kwargs):
    models[:] = [model]
    return one_epoch(model, *args, **kwargs)


StoreDataset.__getitem__ = recording_getitem
trainer.train_one_epoch = capturing_epoch
torch.set_num_threads(1)
train(TrainConfig(student="test_resnet", out=out, stores=(store,), epochs=2, batch_size=8,
                  input_size=32, num_workers=0, device="cpu", ema=0.9, threads=1))
module = models[0].module if hasattr(models[0], "module") else models[0]
torch.save({"seen": seen, "state_dict": module.state_dict(), "ddp": hasattr(models[0], "module")},
           os.path.join(record_dir, f"rank{os.environ['RANK']}.pt"))
