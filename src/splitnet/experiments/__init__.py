"""The paper's experiments on top of training: `splitnet reproduce` (report.py), `splitnet ablate`
(ablate.py: the suite's files and the table; step_time.py, run_pool.py and ablation_rows.py: its step
times, its runs and its rows and plots), Figure 1 (fig1.py) and Figures 3 and 4 (figures.py)."""
