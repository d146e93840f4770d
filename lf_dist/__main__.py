from lf_dist.cli import entry

entry()
