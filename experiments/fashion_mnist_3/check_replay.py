"""Study 3: is a stored view replayed by training the view the teacher labeled? (a check, not a row)

Runs teacher T3 on the training path's replay (``ViewReplay``, as ``train-student`` renders a
view: records applied, partner included) of 40 evenly spaced rows of a store of L, every view,
and prints per view the share of rows whose top-1 equals the stored top-1 and the largest
|p - stored p| over the stored top-k. Used on the 16-view ``ra`` store after question 1
(docs/results.md, "Where study 3 stands"):

    PYTHONPATH=$PWD python experiments/fashion_mnist_3/check_replay.py /work/fm3/full/stores/L_ra_v16.zarr
"""
import numpy as np, torch, labelstore, sys
from teacher_infer.config import InferConfig
from teacher_infer.model import load_teacher
from teacher_infer.imaging import pixels_to_input
from teacher_infer.imaging.augment import ViewReplay
torch.set_num_threads(1)
path = sys.argv[1]
store = labelstore.open(path).load()
stored = store.read(slice(None))
cfg = InferConfig(model="resnet10t", data="-", out="-", checkpoint=sys.argv[2] if len(sys.argv) > 2 else "/work/fm3/full/runs/teacher_T3_s0/last.pt",
                  input_size=32, num_classes=10)
m = load_teacher(cfg, torch.device("cpu"))
replay = ViewReplay(store, root=sys.argv[3] if len(sys.argv) > 3 else "/work/fm3/full/data/images", input_size=32, interpolation=m.data_config["interpolation"])
rows = list(range(0, len(store), len(store)//40))[:40]
V = store.num_views
agree = np.zeros(V); maxdp = np.zeros(V)
for row in rows:
    px = torch.stack([replay(row, v) for v in range(V)])
    x = pixels_to_input(px, torch.tensor(m.data_config["mean"]), torch.tensor(m.data_config["std"]))
    with torch.no_grad():
        p = torch.softmax(m.model(x).float(), -1)
    top = p.argmax(-1).numpy()
    agree += top == stored.indices[row, :, 0]
    sp = np.take_along_axis(p.numpy(), stored.indices[row].astype(int), 1)
    maxdp = np.maximum(maxdp, np.abs(sp - stored.probs[row]).max(1))
print(path, "top1 agreement per view", (agree/len(rows)).round(2).tolist())
print("max |dp| per view", maxdp.round(3).tolist())
