"""seam: stitched ResNet34/ResNet50 families (SEAM / SN-Net style), trained, evaluated and selected.

Modules: ``models`` (width-scalable torchvision ResNets, cut points, stitched family), ``stitch``
(1x1-conv stitching layers and their least-squares initialisation), ``data`` (CIFAR-10 npz and
ImageFolder loaders), ``measure`` (FLOPs, parameters, latency), ``train``, ``evaluate``, ``select``,
``reference`` (plain reference computations the tests and checks compare against), ``cli``.
Nothing here is imported by ``gpulab --help``.
"""
