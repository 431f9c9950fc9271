from phasecast.cli import main

main()
