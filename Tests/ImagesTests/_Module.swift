// ImagesTests
