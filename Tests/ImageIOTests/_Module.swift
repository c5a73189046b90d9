// ImageIOTests
