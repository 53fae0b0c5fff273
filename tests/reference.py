"""An independent single-device AlexNet for the tests, written from the paper, not from splitnet.

Functional: it takes a grouped state dict (conv1.weight ... fc8.bias) and a dict of conv groups, and
computes the paper's network with F.conv2d(groups=...), the LRN formula of §3.3 written out as a
loop over channels, within each group, overlapping 3/2 max pooling, and dropout at test time (x0.5).
"""
import torch
import torch.nn.functional as F


def lrn_formula(a, n=5, alpha=1e-4, beta=0.75, k=2.0):
    """b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, channels = dim 1."""
    N = a.shape[1]
    sq = a * a
    out = []
    for i in range(N):
        lo, hi = max(0, i - n // 2), min(N - 1, i + n // 2)
        out.append(a[:, i] / (k + alpha * sq[:, lo:hi + 1].sum(1)) ** beta)
    return torch.stack(out, 1)


def lrn_per_group(a, groups):
    return torch.cat([lrn_formula(p) for p in a.chunk(groups, 1)], 1)


def reference_forward(sd, x, groups, lrn_groups, pad=(0, 3, 0, 3), conv1=(4, 0)):
    """groups: conv groups per conv layer; lrn_groups: number of columns (LRN never crosses them);
    conv1: its (stride, padding): (4, 0) after the 3-pixel pad at the paper's scale, (1, 2) at CIFAR's."""
    x = F.pad(x, pad)
    x = F.relu(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], stride=conv1[0], padding=conv1[1]))
    x = F.max_pool2d(lrn_per_group(x, lrn_groups), 3, 2)
    x = F.relu(F.conv2d(x, sd["conv2.weight"], sd["conv2.bias"], padding=2, groups=groups["conv2"]))
    x = F.max_pool2d(lrn_per_group(x, lrn_groups), 3, 2)
    x = F.relu(F.conv2d(x, sd["conv3.weight"], sd["conv3.bias"], padding=1, groups=groups["conv3"]))
    x = F.relu(F.conv2d(x, sd["conv4.weight"], sd["conv4.bias"], padding=1, groups=groups["conv4"]))
    x = F.relu(F.conv2d(x, sd["conv5.weight"], sd["conv5.bias"], padding=1, groups=groups["conv5"]))
    x = F.max_pool2d(x, 3, 2).flatten(1)
    x = 0.5 * F.relu(F.linear(x, sd["fc6.weight"], sd["fc6.bias"]))
    x = 0.5 * F.relu(F.linear(x, sd["fc7.weight"], sd["fc7.bias"]))
    return F.linear(x, sd["fc8.weight"], sd["fc8.bias"])


# Conv groups of the single-device equivalent of each split layout, spelled out by hand.
GROUPS = {
    "paper": dict(conv2=2, conv3=1, conv4=2, conv5=2),
    "towers": dict(conv2=2, conv3=2, conv4=2, conv5=2),
    "dense": dict(conv2=1, conv3=1, conv4=1, conv5=1),
    "four-columns": dict(conv2=4, conv3=1, conv4=4, conv5=4),
}
COLUMNS = {"paper": 2, "towers": 2, "dense": 2, "four-columns": 4}


def rel(a, b):
    """Relative difference of two tensors in norm."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
