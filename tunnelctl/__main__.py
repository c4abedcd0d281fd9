from tunnelctl.entry import main

main()
