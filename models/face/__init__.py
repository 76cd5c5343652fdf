"""Face client (paper 003): 3D RPN landmark detector with IoU-balanced loss and a graph prior.

Modules: ``net`` (backbone + RPN head), ``anchors`` (anchors, IoU, Eq. 1 coding, labelling),
``losses`` (Eq. 2-3), ``graph_prior`` (Eq. 4), ``metrics``, ``dataset``, ``train``, ``evaluate``;
``python -m models.face train|evaluate``.
"""
