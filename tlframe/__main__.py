from tlframe.cli import main

main()
