from slimseg.cli import main

raise SystemExit(main())
