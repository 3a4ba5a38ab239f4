"""A user model named by import path in a config (`custom_model:TinyNet`), for the registry test."""

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_dim, n_classes, width=8, depth=1, scale=1.0):
        super().__init__()
        self.scale = scale
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.Tanh(), nn.Linear(width, n_classes))

    def forward(self, x):
        return self.net(x) * self.scale


class RaisesInInit(nn.Module):
    def __init__(self, in_dim, n_classes, width=8, depth=1):
        super().__init__()
        raise ValueError("this model refuses to be built")


class NoCapacityKnobs(nn.Module):
    def __init__(self, in_dim, n_classes):
        super().__init__()
        self.linear = nn.Linear(in_dim, n_classes)
