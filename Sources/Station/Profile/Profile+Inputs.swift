import Foundation

extension Profile {
    /// Every file this profile names (image, explicit bmap, blobs, Tegra inputs) with the
    /// location of the key that names it.
    public var inputFiles: [(path: String, location: ConfigLocation)] {
        var files: [(String, ConfigLocation)] = []
        if let image {
            files.append((image.file, image.location))
            if case .file(let bmap) = image.bmap { files.append((bmap, image.location)) }
        }
        files += blobs.map { ($0.file, $0.location) }
        if let tegra {
            files += [tegra.miniloader, tegra.bct, tegra.uboot].map { ($0, tegra.location) }
            if let dtb = tegra.ubootDTB { files.append((dtb, tegra.location)) }
        }
        return files
    }

    /// Throws for the first named file that does not exist. Parsing does not check this (the
    /// tree's profiles name images built elsewhere); a job does, before touching a card.
    public func checkInputsExist() throws {
        // URLs are checked when a job downloads them.
        for (path, location) in inputFiles where !path.hasPrefix("http://") && !path.hasPrefix("https://") && !FileManager.default.isReadableFile(atPath: path) {
            throw location.error("file not found or unreadable: \(path)")
        }
    }
}
