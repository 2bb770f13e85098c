"""Study 3: is a stored view replayed by training the view the teacher labeled? (a check, not a row)

Runs teacher T3 on the training path's replay (``ViewReplay``, as ``train-student`` renders a
view: records applied, partner included) of 40 evenly spaced rows of a store of L, every view,
and prints per view the share of rows whose top-1 equals the stored top-1 and the largest
|p - stored p| over the stored top-k. Used on the 16-view ``ra`` store after question 1
(docs/results.md, "Where study 3 stands"):

    PYTHONPATH=$PWD python experiments/fashion_mnist_3/check_replay.py \\
        /work/fm3/full/stores/L_ra_v16.zarr
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import labelstore
from teacher_infer.config import InferConfig
from teacher_infer.imaging import pixels_to_input
from teacher_infer.imaging.augment import ViewReplay
from teacher_infer.model import load_teacher

WORK = "/work/fm3/full"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--checkpoint", default=f"{WORK}/runs/teacher_T3_s0/last.pt")
    parser.add_argument("--root", default=f"{WORK}/data/images")
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = labelstore.open(args.store).load()
    stored = store.read(slice(None))
    config = InferConfig(model="resnet10t", data="-", out="-", checkpoint=args.checkpoint,
                         input_size=32, num_classes=10)
    teacher = load_teacher(config, torch.device("cpu"))
    mean, std = (torch.tensor(teacher.data_config[k]) for k in ("mean", "std"))
    replay = ViewReplay(store, root=args.root, input_size=32,
                        interpolation=teacher.data_config["interpolation"])
    rows = np.linspace(0, len(store) - 1, args.rows).astype(int)
    agree, worst = np.zeros(store.num_views), np.zeros(store.num_views)
    for row in rows:
        pixels = torch.stack([replay(int(row), v) for v in range(store.num_views)])
        with torch.no_grad():
            probs = torch.softmax(teacher.model(pixels_to_input(pixels, mean, std)).float(), -1)
        agree += probs.argmax(-1).numpy() == stored.indices[row, :, 0]
        again = np.take_along_axis(probs.numpy(), stored.indices[row].astype(int), 1)
        worst = np.maximum(worst, np.abs(again - stored.probs[row]).max(1))
    print(args.store, "top-1 agreement per view", (agree / len(rows)).round(2).tolist())
    print("max |dp| per view", worst.round(3).tolist())


if __name__ == "__main__":
    main()
