import sys

from ais_bench.infer import main

sys.exit(main(sys.argv[1:]))
