from lmlab.cli import main

raise SystemExit(main())
