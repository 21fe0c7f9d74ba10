"""The article's script: pytorch/examples vae/main.py, the baseline of benchmarks/pipeline.py.

The same program as the example: torchvision's MNIST through a DataLoader (ToTensor, batch 128,
shuffled), the MLP VAE 784-400-20 with a sigmoid decoder, Adam at lr 1e-3, the loss BCE summed over
pixels and batch plus the analytic KL, `loss.item()` every step, a pass over the test set after every
epoch. One difference: the example writes a reconstruction grid and a 64-sample grid after every
epoch; this writes the 64-sample grid once, after the last epoch, as `vaeops train` does.

    .venv/bin/python benchmarks/article_vae.py [--epochs 10] [--data ../data] [--results results]

--data is torchvision's MNIST root (MNIST/raw/ under it holds the four IDX files); download=True
fetches them when missing, as in the example. benchmarks/pipeline.py fills it from the offline mirror.
"""

import argparse
from pathlib import Path

import torch
import torch.utils.data
from torch import nn, optim
from torch.nn import functional as F
from torchvision import datasets, transforms
from torchvision.utils import save_image


class VAE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    """Reconstruction + KL divergence, summed over all elements and the batch (Kingma & Welling,
    appendix B: -KL = 0.5 * sum(1 + log(sigma^2) - mu^2 - sigma^2))."""
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def train(epoch, model, optimizer, loader, device, log_interval):
    model.train()
    train_loss = 0
    for batch_idx, (data, _) in enumerate(loader):
        data = data.to(device)
        optimizer.zero_grad()
        recon_batch, mu, logvar = model(data)
        loss = loss_function(recon_batch, data, mu, logvar)
        loss.backward()
        train_loss += loss.item()
        optimizer.step()
        if batch_idx % log_interval == 0:
            print(
                f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(loader.dataset)} "
                f"({100.0 * batch_idx / len(loader):.0f}%)]\tLoss: {loss.item() / len(data):.6f}"
            )
    print(f"====> Epoch: {epoch} Average loss: {train_loss / len(loader.dataset):.4f}")


def test(model, loader, device):
    model.eval()
    test_loss = 0
    with torch.no_grad():
        for data, _ in loader:
            data = data.to(device)
            recon_batch, mu, logvar = model(data)
            test_loss += loss_function(recon_batch, data, mu, logvar).item()
    test_loss /= len(loader.dataset)
    print(f"====> Test set loss: {test_loss:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="VAE MNIST Example")
    parser.add_argument("--batch-size", type=int, default=128, help="input batch size for training")
    parser.add_argument("--epochs", type=int, default=10, help="number of epochs to train")
    parser.add_argument("--no-accel", action="store_true", help="disables accelerator")
    parser.add_argument("--seed", type=int, default=1, help="random seed")
    parser.add_argument("--log-interval", type=int, default=10, help="batches between training logs")
    parser.add_argument("--data", default="../data", help="torchvision's MNIST root")
    parser.add_argument("--results", type=Path, default=Path("results"), help="folder for the sample grid")
    args = parser.parse_args()

    use_accel = not args.no_accel and torch.accelerator.is_available()
    torch.manual_seed(args.seed)
    device = torch.accelerator.current_accelerator() if use_accel else torch.device("cpu")
    print(f"Using device: {device}")

    kwargs = {"num_workers": 1, "pin_memory": True} if use_accel else {}
    train_loader = torch.utils.data.DataLoader(
        datasets.MNIST(args.data, train=True, download=True, transform=transforms.ToTensor()),
        batch_size=args.batch_size,
        shuffle=True,
        **kwargs,
    )
    test_loader = torch.utils.data.DataLoader(
        datasets.MNIST(args.data, train=False, transform=transforms.ToTensor()),
        batch_size=args.batch_size,
        shuffle=False,
        **kwargs,
    )

    model = VAE().to(device)
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(1, args.epochs + 1):
        train(epoch, model, optimizer, train_loader, device, args.log_interval)
        test(model, test_loader, device)
    with torch.no_grad():
        sample = model.decode(torch.randn(64, 20).to(device)).cpu()
    args.results.mkdir(parents=True, exist_ok=True)
    save_image(sample.view(64, 1, 28, 28), args.results / "sample.png")


if __name__ == "__main__":
    main()
