from fastpretrain.cli import main

raise SystemExit(main())
