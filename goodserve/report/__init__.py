"""HTML reports with plots from simulation outputs and live results (``goodserve report``)."""
