"""The original's face-side PyTorch pieces, rebuilt for the face tests and scripts/torch_train_step.py.

SFNet-20, written from opensphere's backbone code and the checkpoint's facts, not from the Flax
model: four stages, each a 3x3 stride-2 entry conv (`layer{s}.0.conv1`, `conv` in older releases) + ReLU,
then 1, 2, 4, 1 basic blocks; a channel-major flatten of the 7x7 map into `fc`. "sfnet20_deprecated" (the
released checkpoint's): convs with bias, no normalisation, ReLU before the identity is added; "sfnet20":
BatchNorm after every conv (no conv bias) and on the features, ReLU after the sum. The stage widths and the
feature size are arguments (the original's: 64, 128, 256, 512 and 512).

reference_face_chip: the original's crop_face (docs/method.md#one-training-step), one image at a time: slice the box, pad with
-1 where it leaves the image, bilinear resize as torchvision 0.16 did on tensors (no antialiasing).
reference_square_box: the original's expand_bbox with target_ratio 1 (the square box that crop is cut from).
"""

import torch
import torchvision.transforms.functional as TF
from torch import nn

SFNET20_BLOCKS = (1, 2, 4, 1)  # basic blocks after each stage's entry conv


def _conv3x3(cin, cout, stride, batch_norm):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not batch_norm)


class StageEntry(nn.Module):  # opensphere ConvBlock
    def __init__(self, cin, cout, batch_norm, conv_name="conv1"):
        super().__init__()
        self.conv_name = conv_name
        setattr(self, conv_name, _conv3x3(cin, cout, 2, batch_norm))
        self.bn1 = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()

    def forward(self, x):
        return torch.relu(self.bn1(getattr(self, self.conv_name)(x)))


class Block(nn.Module):  # opensphere BasicBlock
    def __init__(self, width, batch_norm):
        super().__init__()
        self.batch_norm = batch_norm
        self.conv1 = _conv3x3(width, width, 1, batch_norm)
        self.conv2 = _conv3x3(width, width, 1, batch_norm)
        self.bn1 = nn.BatchNorm2d(width) if batch_norm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(width) if batch_norm else nn.Identity()

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        if self.batch_norm:  # sfnet.py: ReLU after the identity is added
            return torch.relu(self.bn2(y) + x)
        return torch.relu(y) + x  # sfnet_deprecated.py: ReLU before the identity is added


class TorchSFNet20(nn.Module):
    """x [N, 3, 112, 112] in [-1, 1] -> features [N, feature_dim] (not normalised)."""

    def __init__(self, batch_norm, conv_name="conv1", widths=(64, 128, 256, 512), feature_dim=512):
        super().__init__()
        cin = 3
        for stage, (width, count) in enumerate(zip(widths, SFNET20_BLOCKS), start=1):
            layers = [StageEntry(cin, width, batch_norm, conv_name)] + [Block(width, batch_norm) for _ in range(count)]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
            cin = width
        self.fc = nn.Linear(cin * 7 * 7, feature_dim)
        self.features = nn.BatchNorm1d(feature_dim) if batch_norm else nn.Identity()

    def forward(self, x):
        for stage in range(1, len(SFNET20_BLOCKS) + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.features(self.fc(torch.flatten(x, 1)))


def reference_face_chip(image_chw: torch.Tensor, box, size: int) -> torch.Tensor:
    """image_chw [3, H, W] in [-1, 1], box (x1, y1, x2, y2) integer pixels -> chip [3, size, size]."""
    x1, y1, x2, y2 = (int(v) for v in box)
    height, width = image_chw.shape[-2:]
    crop = image_chw[:, max(y1, 0):min(y2, height), max(x1, 0):min(x2, width)]
    crop = TF.pad(crop, [max(-x1, 0), max(-y1, 0), max(x2 - width, 0), max(y2 - height, 0)], fill=-1.0)
    return TF.resize(crop, [size, size], antialias=False)


def reference_square_box(box, expand_coef: float) -> list[int]:
    """The original's expand_bbox with target_ratio 1, in Python floats."""
    width, height = box[2] - box[0], box[3] - box[1]
    if height / width > 1:
        more_height = height * expand_coef
        more_width = height + more_height - width
    else:
        more_width = width * expand_coef
        more_height = width + more_width - height
    return [round(box[0] - more_width / 2), round(box[1] - more_height / 2),
            round(box[2] + more_width / 2), round(box[3] + more_height / 2)]
