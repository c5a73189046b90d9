// TegraTests
