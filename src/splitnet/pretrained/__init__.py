"""Trained networks in and out: import (Caffe, torchvision), load, predict, export."""
