"""The paper's experiments on top of training: `splitnet reproduce` (report.py), `splitnet ablate`
(ablate.py), Figure 1 (fig1.py) and Figures 3 and 4 (figures.py)."""
