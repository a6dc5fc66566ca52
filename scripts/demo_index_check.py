"""After `make demo`: change the demo's own index the way a user does and check it still equals an
index built from scratch (issue 24's done-when).

    .venv/bin/python scripts/demo_index_check.py runs/demo-48 /tmp/demo-check

Steps: `deephash index add --images` (10 Fashion-MNIST test images in two class folders), `index
remove` of the largest id and of id 0, a writable `deephash serve --fold-every 2` with two adds, a
delete of the largest id, one more add, a search and SIGTERM; then `index info`. Checks: no id is
handed out twice (a deleted id never comes back), the shutdown folds the journal and releases the
lock, `next_id` is one past every id handed out, and the final index equals a `HashIndex` built
from scratch from `deephash encode` of the same items (codes, labels, paths exact, re-rank vectors
within float16 rounding, stored images of the added items present and of the removed ones gone).
It changes the index in RUN/index: run it on a copy to keep the original.
"""
import gzip, json, os, signal, subprocess, sys, time, shutil
from pathlib import Path
import numpy as np, httpx
from PIL import Image
from deephash.retrieval.index import HashIndex
from deephash.retrieval.codes import load_codes

DH = [sys.executable, "-m", "deephash"]
run = Path(sys.argv[1]); index = run / "index"; work = Path(sys.argv[2]); shutil.rmtree(work, ignore_errors=True); work.mkdir()
def sh(*args):
    out = subprocess.run([*DH, *map(str, args)], capture_output=True, text=True)
    print("$ deephash", *args, "->", out.returncode, (out.stdout + out.stderr).strip()[-400:])
    assert out.returncode == 0
    return out.stdout
with gzip.open("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz") as f:
    images = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)
with gzip.open("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") as f:
    labels = np.frombuffer(f.read()[8:], np.uint8)
classes = HashIndex.load(index).metadata["classes"]
new = work / "new"
for cls in (1, 8):  # Trouser, Bag
    (new / classes[cls]).mkdir(parents=True)
    for j in np.flatnonzero(labels == cls)[:5]:
        Image.fromarray(images[j]).save(new / classes[cls] / f"t{j}.png")
before = HashIndex.load(index); handed = set(before.ids.tolist()); next0 = before.next_id
out = sh("index", "add", index, "--run", run, "--images", new)
after_add = HashIndex.load(index); added = sorted(set(after_add.ids.tolist()) - handed)
assert len(added) == 10 and min(added) == next0, (added, next0); handed |= set(added)
largest = max(after_add.ids.tolist())
sh("index", "remove", index, largest, 0)
# a writable service: two adds, a delete of the largest id, an add after it, fold-every 2, SIGTERM
token = "demo-check-token"; env = dict(os.environ, DEMO_TOKEN=token)
import socket
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
proc = subprocess.Popen([*DH, "serve", str(index), "--run", str(run), "--port", str(port), "--token-env", "DEMO_TOKEN",
                         "--fold-every", "2"], env=env, stdout=open(work / "serve.log", "w"), stderr=subprocess.STDOUT)
base = f"http://127.0.0.1:{port}"
for _ in range(120):
    try:
        if httpx.get(base + "/healthz", timeout=1).status_code == 200: break
    except httpx.HTTPError: time.sleep(0.5)
auth = {"Authorization": f"Bearer {token}"}
served = []
def png(j):
    from io import BytesIO
    b = BytesIO(); Image.fromarray(images[j]).save(b, format="PNG"); return b.getvalue()
for j in (3, 5):
    r = httpx.post(base + "/api/items", files={"image": ("q.png", png(j), "image/png")}, data={"label": str(labels[j])}, headers=auth, timeout=60)
    assert r.status_code == 201, r.text; served.append((r.json()["id"], j))
big = max(i for i, _ in served)
r = httpx.delete(f"{base}/api/items/{big}", headers=auth, timeout=60); assert r.status_code == 204, r.text
served = [(i, j) for i, j in served if i != big]
r = httpx.post(base + "/api/items", files={"image": ("q.png", png(7), "image/png")}, data={"label": str(labels[7])}, headers=auth, timeout=60)
assert r.status_code == 201; served.append((r.json()["id"], 7))
ids_served = [i for i, _ in served] + [big]
assert not (set(ids_served) & handed) and len(set(ids_served)) == 3, (ids_served, "reused!")
handed |= set(ids_served)
hits = httpx.post(base + "/api/search", files={"image": ("q.png", png(7), "image/png")}, data={"k": "3"}, timeout=60).json()
print("search after adds:", [(h["id"], h["distance"]) for h in hits["results"]])
proc.send_signal(signal.SIGTERM); rc = proc.wait(60)
print("server exit", rc); print(open(work / "serve.log").read()[-600:])
assert rc in (0, -signal.SIGTERM) and "Traceback" not in open(work / "serve.log").read()  # uvicorn re-raises SIGTERM after its graceful shutdown
assert (index / "journal.log").stat().st_size == 0 if (index / "journal.log").exists() else True
import fcntl; fd = os.open(index / ".lock", os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.close(fd)  # released
final = HashIndex.load(index)
info = sh("index", "info", index)
assert f"next_id  {max(handed) + 1}" in info, info
# from scratch: the demo's train split codes (index build's cache) + the added items encoded afresh
sh("encode", run, "--split", "train", "--out", work / "train.npz")
sh("encode", run, "--images", new, "--out", work / "new.npz")
served_dir = work / "served"; (served_dir / "x").mkdir(parents=True)
for i, j in served: Image.fromarray(images[j]).save(served_dir / "x" / f"{i}.png")
sh("encode", run, "--images", served_dir, "--out", work / "served.npz")
train, newc, servc = load_codes(work / "train.npz"), load_codes(work / "new.npz"), load_codes(work / "served.npz")
rows = {}
for n, i in enumerate(train.ids.tolist()): rows[i] = (train.codes[n], int(train.labels[n]), train.rerank[n], "")
for n, p in enumerate(newc.full_paths()):
    cls = classes.index(Path(p).parent.name)
    i = added[n]; rows[i] = (newc.codes[n], cls, newc.rerank[n], p)
for n, p in enumerate(servc.paths.tolist()):
    i = int(Path(p).stem); j = dict(served)[i]; rows[i] = (servc.codes[n], int(labels[j]), servc.rerank[n], "")
for gone in (largest, 0, big): rows.pop(gone, None)
order = final.ids.tolist()
assert sorted(order) == sorted(rows), (len(order), len(rows))
scratch = HashIndex(final.bits, metadata=final.metadata)
scratch.add(np.stack([rows[i][0] for i in order]), ids=np.array(order), labels=np.array([rows[i][1] for i in order]),
            rerank=np.stack([rows[i][2] for i in order]),
            paths=None if final.paths is None else [rows[i][3] for i in order])
assert np.array_equal(final.codes, scratch.codes), "codes"
assert np.array_equal(final.labels, scratch.labels), "labels"
assert np.abs(final.rerank_vectors.astype(np.float32) - scratch.rerank_vectors.astype(np.float32)).max() <= 2e-3, "rerank"
if final.paths is None:  # a split-built index keeps no paths: the added items' images are stored instead
    assert scratch.paths is None
    kept_added = [i for i in added + [i for i, _ in served] if i in rows]
    assert all((index / "items" / f"{i}.png").is_file() for i in kept_added), "stored item images"
    assert not any((index / "items" / f"{i}.png").exists() for i in (largest, big)), "removed items' images"
else:
    assert final.paths.tolist() == scratch.paths.tolist(), "paths"
print(f"OK: {len(final)} items, next_id {final.next_id}, ids handed out {len(handed)}, none twice; equal to a scratch build "
      "(codes, labels, paths exact; re-rank vectors within", float(np.abs(final.rerank_vectors.astype(np.float32) - scratch.rerank_vectors.astype(np.float32)).max()), ")")
