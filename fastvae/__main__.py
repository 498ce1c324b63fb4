from fastvae.app.cli import main

raise SystemExit(main())
