"""A few-epoch VAE on data/processed, saved with the train stage's checkpoint contract.

For developing and checking the evaluate/export stages without the train stage:

    .venv/bin/python tests/scripts/quick_checkpoint.py --out /tmp/ck --arch mlp --latent-dim 20 --epochs 3

writes /tmp/ck/vae.pt and /tmp/ck/run.json (an MLflow run in the store MLFLOW_TRACKING_URI names,
or the embedded one in the current folder).
"""

import argparse
import json
from pathlib import Path

import torch

from vaeops import losses, models, tracking
from vaeops.stages.preprocess import load_split


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("data/processed"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", default="mlp")
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--hidden-dim", type=int, default=400)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only")
    p.add_argument("--binarize", action="store_true")
    p.add_argument("--experiment", default="vaeops")
    a = p.parse_args()

    torch.manual_seed(0)
    meta = json.loads((a.data / "meta.json").read_text())
    images, _ = load_split(a.data / "train.npz")
    if a.limit:
        images = images[: a.limit]
    x_all = torch.from_numpy(images).float() / 255
    model = models.build_model(a.arch, tuple(meta["image_shape"]), a.latent_dim, a.hidden_dim)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for epoch in range(a.epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(x_all)).split(128):
            x = x_all[idx]
            if a.binarize:
                x = torch.bernoulli(x)
            logits, mu, logvar = model(x)
            recon, kl = losses.elbo_terms(logits, x, mu, logvar)
            loss = (recon + kl).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
        print(f"epoch {epoch + 1}: train elbo {-total / len(x_all):.2f}")

    import mlflow

    experiment_id = tracking.setup(a.experiment)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric("train/elbo", -total / len(x_all))
    config = {
        "arch": a.arch,
        "latent_dim": a.latent_dim,
        "hidden_dim": a.hidden_dim,
        "image_shape": list(meta["image_shape"]),
        "dataset": meta["dataset"],
        "binarize": a.binarize,
    }
    state = models.checkpoint(model.eval(), config, run_id=run.info.run_id, epoch=a.epochs)
    models.save_checkpoint(a.out / "vae.pt", state)
    tracking.write_run_file(a.out / "run.json", run.info.run_id, experiment_id)
    print(f"wrote {a.out / 'vae.pt'} and {a.out / 'run.json'}")


if __name__ == "__main__":
    main()
