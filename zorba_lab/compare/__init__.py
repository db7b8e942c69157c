"""The bench beside the product: run modes compared (on the simulator and as real processes),
their statistics, and the results page and plots the benchmarks write (benchmarks/compare.py,
benchmarks/compare_processes.py). Nothing in the product imports this package. It composes the
page's text and the benchmarks write it to docs/; the plot functions save PNGs beside the page
path a benchmark gives them."""
