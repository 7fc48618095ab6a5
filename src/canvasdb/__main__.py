from canvasdb.cli import main

main()
