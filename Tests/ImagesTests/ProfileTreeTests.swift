import Foundation
import Station
import Testing

/// Every profile committed under images/ parses, and says what its board needs.
struct ProfileTreeTests {
    @Test func everyProfileInTheTreeParses() throws {
        let catalog = try ProfileCatalog.load(directory: imagesDirectory.path)
        #expect(catalog.problems.isEmpty, "\(catalog.problems.map(\.description).joined(separator: "\n"))")
        // Every directory with a profile.toml (jetson-tk1 included once it lands) is loaded.
        let directories = try FileManager.default.contentsOfDirectory(atPath: imagesDirectory.path).filter {
            FileManager.default.fileExists(atPath: imagesDirectory.appendingPathComponent("\($0)/profile.toml").path)
        }
        #expect(Set(catalog.names) == Set(directories))
        for name in ["rpi", "nixos-sd-armv7l", "pcduino3-nano", "iso-hybrid", "qemu-vexpress"] {
            #expect(catalog[name] != nil, "images/\(name)/profile.toml is missing")
        }
    }

    @Test func boardsSayWhatTheyNeed() throws {
        let catalog = try ProfileCatalog.load(directory: imagesDirectory.path)
        let rpi = try #require(catalog["rpi"])
        #expect(rpi.root?.selector == .partition(2))
        #expect(rpi.partitions.map(\.filesystem) == [.vfat, .ext4])

        let nixos = try #require(catalog["nixos-sd-armv7l"])
        #expect(nixos.root?.selector == .label("NIXOS_SD"))
        #expect(nixos.partitions.compactMap(\.label) == ["FIRMWARE", "NIXOS_SD"])

        let pcduino = try #require(catalog["pcduino3-nano"])
        #expect(pcduino.blobs.map(\.offset) == [8192])
        #expect(pcduino.blobs.first.map { URL(fileURLWithPath: $0.file).lastPathComponent } == "u-boot-sunxi-with-spl.bin")

        let iso = try #require(catalog["iso-hybrid"])
        #expect(iso.inject == false && iso.users.isEmpty && iso.image?.bmap == Profile.BmapSource.none)

        let vexpress = try #require(catalog["qemu-vexpress"])
        #expect(vexpress.root?.selector == .partition(2))
        #expect(vexpress.image?.file.hasSuffix("qemu-vexpress/vexpress-test.img.zst") == true)
    }

    @Test func brokenProfileIsReportedWithoutHidingTheOthers() throws {
        let directory = try makeTemporaryDirectory("catalog")
        defer { try? FileManager.default.removeItem(at: directory) }
        for (name, text) in [("good", "name = \"good\"\nimage = \"g.img\"\n"), ("bad", "name = \"bad\"\nimage = \"b.img\"\nverify = 1\n")] {
            let folder = directory.appendingPathComponent(name)
            try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
            try text.write(to: folder.appendingPathComponent("profile.toml"), atomically: true, encoding: .utf8)
        }
        let catalog = try ProfileCatalog.load(directory: directory.path)
        #expect(catalog.names == ["good"])
        #expect(catalog.problems.count == 1)
        #expect(catalog.problems.first?.line == 3 && catalog.problems.first?.keyPath == "verify")
        #expect(throws: ConfigError.self) { try catalog.requireNoProblems() }
    }

    @Test func rpiProfileMatchesTheBuiltTestImage() throws {
        // The profile states the layout; the image the script builds must have exactly it,
        // and the profile's own files must then exist.
        let parent = try makeTemporaryDirectory("rpi-profile")
        defer { try? FileManager.default.removeItem(at: parent) }
        let copy = parent.appendingPathComponent("rpi")
        try FileManager.default.createDirectory(at: copy, withIntermediateDirectories: true)
        let profileFile = copy.appendingPathComponent("profile.toml").path
        try FileManager.default.copyItem(atPath: imagesDirectory.appendingPathComponent("rpi/profile.toml").path, toPath: profileFile)
        var profile = try Profile.load(file: profileFile)
        #expect(throws: ConfigError.self) { try profile.checkInputsExist() }

        try buildTestImage(into: copy)
        profile = try Profile.load(file: profileFile)
        try profile.checkInputsExist()

        let json = try runChecked(["sfdisk", "--json", copy.appendingPathComponent("rpi-test.img").path]).stdout
        let table = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        let partitions = try #require((table["partitiontable"] as? [String: Any])?["partitions"] as? [[String: Any]])
        #expect(partitions.count == profile.partitions.count)
        for (stated, actual) in zip(profile.partitions, partitions) {
            #expect(stated.start == (actual["start"] as? Int).map { UInt64($0) * 512 })
            #expect(stated.size == (actual["size"] as? Int).map { UInt64($0) * 512 })
        }
        // A sunxi-sized U-Boot at 8 KiB fits this image; the write engine feeds the same extents.
        let extents = partitions.enumerated().map { index, entry in
            (number: index + 1, startByte: UInt64(entry["start"] as? Int ?? -1) * 512, sizeBytes: UInt64(entry["size"] as? Int ?? -1) * 512)
        }
        let uboot = Profile.BlobPlacement(file: "u-boot-sunxi-with-spl.bin", offset: 8192, length: 600 << 10,
                                          location: ConfigLocation(file: "x", line: 1, keyPath: "blobs[0]"))
        try Profile.checkBlobPlacements([uboot], against: extents)
    }
}

extension ProfileTreeTests {
    @Test func missingProfileDirectoryIsAnError() throws {
        #expect(throws: ConfigError.self) { try ProfileCatalog.load(directory: "/nonexistent/provision-images") }
    }

    @Test func unreadableProfileFileNamesTheFile() throws {
        do {
            _ = try Profile.load(file: "/nonexistent/board/profile.toml")
            Issue.record("a missing profile file must be an error")
        } catch let error as ConfigError {
            #expect(error.file == "/nonexistent/board/profile.toml" && error.message.contains("cannot read"))
        }
    }
}
