"""Everything that touches Ray: cluster start/connect, logits workers, CPU tasks, Tune trials.

No other package imports ``ray``; they provide plain functions that the code here schedules.
"""
