import Foundation
import Testing

/// images/build-test-image: the seed's Raspberry Pi layout, reproducible, without root or a VM.
@Suite(.serialized) struct BuildTestImageTests {
    @Test func sameEpochGivesByteIdenticalImageBmapAndZst() throws {
        let first = try makeTemporaryDirectory("image-a"), second = try makeTemporaryDirectory("image-b")
        defer { try? FileManager.default.removeItem(at: first); try? FileManager.default.removeItem(at: second) }
        let outputsA = try buildTestImage(into: first)
        let outputsB = try buildTestImage(into: second)
        #expect(outputsA.map { URL(fileURLWithPath: $0).lastPathComponent }
                == ["rpi-test.img", "rpi-test.img.bmap", "rpi-test.img.zst"])
        for name in ["rpi-test.img", "rpi-test.img.bmap", "rpi-test.img.zst"] {
            let a = try sha256(first.appendingPathComponent(name).path)
            let b = try sha256(second.appendingPathComponent(name).path)
            #expect(a == b, "\(name) differs between two builds with the same SOURCE_DATE_EPOCH")
        }
        #expect(outputsB.count == 3)
    }

    @Test func differentEpochGivesADifferentImage() throws {
        // The reproducibility test above could pass with an epoch that is ignored; this one
        // shows the epoch really reaches the filesystems.
        let first = try makeTemporaryDirectory("epoch-a"), second = try makeTemporaryDirectory("epoch-b")
        defer { try? FileManager.default.removeItem(at: first); try? FileManager.default.removeItem(at: second) }
        try buildTestImage(into: first, extra: ["--compress", "none"], epoch: "1700000000")
        try buildTestImage(into: second, extra: ["--compress", "none"], epoch: "1700086400")
        #expect(try sha256(first.appendingPathComponent("rpi-test.img").path)
                != sha256(second.appendingPathComponent("rpi-test.img").path))
    }

    @Test(.enabled(if: getuid() == 0, "runuser needs root to build as the unprivileged user nobody"))
    func buildByAnOrdinaryUserIsIdenticalToARootBuild() throws {
        let asRoot = try makeTemporaryDirectory("root-build"), asNobody = try makeTemporaryDirectory("nobody-build")
        defer { try? FileManager.default.removeItem(at: asRoot); try? FileManager.default.removeItem(at: asNobody) }
        try runChecked(["chown", "nobody", asNobody.path])
        try buildTestImage(into: asRoot, extra: ["--compress", "none"])
        try buildTestImage(into: asNobody, extra: ["--compress", "none"], asUser: "nobody")
        #expect(try sha256(asRoot.appendingPathComponent("rpi-test.img").path)
                == sha256(asNobody.appendingPathComponent("rpi-test.img").path))
        // The files inside are root's either way.
        let partition = asNobody.appendingPathComponent("root.part").path
        try runChecked(["dd", "if=\(asNobody.path)/rpi-test.img", "of=\(partition)", "bs=1M", "skip=100", "count=149", "status=none"])
        let stat = try runChecked(["debugfs", "-R", "stat /etc/shadow", partition]).stdout
        #expect(stat.contains("User:     0   Group:     0"))
    }

    @Test func layoutIsTheSeedsRaspberryPiLayout() throws {
        let directory = try makeTemporaryDirectory("layout")
        defer { try? FileManager.default.removeItem(at: directory) }
        try buildTestImage(into: directory, extra: ["--compress", "none"])
        let image = directory.appendingPathComponent("rpi-test.img").path

        let json = try runChecked(["sfdisk", "--json", image]).stdout
        let table = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        let partitionTable = try #require(table["partitiontable"] as? [String: Any])
        #expect(partitionTable["label"] as? String == "dos")
        let partitions = try #require(partitionTable["partitions"] as? [[String: Any]])
        #expect(partitions.count == 2)
        #expect(partitions[0]["start"] as? Int == 2048)            // 1 MiB
        #expect(partitions[0]["size"] as? Int == 98 * 2048)        // to 99 MiB
        #expect(partitions[0]["type"] as? String == "c")           // FAT32 LBA
        #expect(partitions[1]["start"] as? Int == 100 * 2048)      // 100 MiB
        #expect(partitions[1]["size"] as? Int == 149 * 2048)       // to 249 MiB
        #expect(partitions[1]["type"] as? String == "83")

        let boot = directory.appendingPathComponent("boot.part").path
        let root = directory.appendingPathComponent("root.part").path
        try runChecked(["dd", "if=\(image)", "of=\(boot)", "bs=1M", "skip=1", "count=98", "status=none"])
        try runChecked(["dd", "if=\(image)", "of=\(root)", "bs=1M", "skip=100", "count=149", "status=none"])

        let fsck = try run(["fsck.vfat", "-n", boot])
        #expect(fsck.status == 0, "fsck.vfat: \(fsck.stdout)\(fsck.stderr)")
        let listing = try runChecked(["mdir", "-b", "-/", "-i", boot, "::/"], environment: ["MTOOLS_SKIP_CHECK": "1"]).stdout
        for file in ["config.txt", "cmdline.txt", "bootcode.bin", "start.elf", "fixup.dat", "u-boot.bin", "zImage", "bcm2710-rpi-3-b.dtb"] {
            #expect(listing.contains("::/\(file)"), "boot partition lacks \(file)")
        }
        let standIn = try runChecked(["mtype", "-i", boot, "::/zImage"], environment: ["MTOOLS_SKIP_CHECK": "1"]).stdout
        #expect(standIn.hasPrefix("STAND-IN for zImage"))

        let e2fsck = try run(["e2fsck", "-fn", root])
        #expect(e2fsck.status == 0, "e2fsck: \(e2fsck.stdout)")
        let passwd = try runChecked(["debugfs", "-R", "cat /etc/passwd", root]).stdout
        #expect(passwd.hasPrefix("root:x:0:0:"))
        for file in ["/etc/inittab", "/etc/shadow", "/etc/group", "/etc/gshadow", "/etc/login.defs", "/etc/skel/.profile", "/bin/busybox"] {
            let stat = try run(["debugfs", "-R", "stat \(file)", root])
            #expect(stat.stdout.contains("Type: regular"), "\(file) missing from the root filesystem")
        }
        let shell = try runChecked(["debugfs", "-R", "stat /bin/sh", root]).stdout
        #expect(shell.contains("Type: symlink") && shell.contains("/bin/busybox"))
        let label = try runChecked(["e2label", root]).stdout
        #expect(label.trimmingCharacters(in: .whitespacesAndNewlines) == "rootfs")
    }

    @Test func bmapVerifiesWithBmaptoolCopy() throws {
        let directory = try makeTemporaryDirectory("bmap")
        defer { try? FileManager.default.removeItem(at: directory) }
        try buildTestImage(into: directory)
        let image = directory.appendingPathComponent("rpi-test.img").path
        let copy = directory.appendingPathComponent("copy.img").path
        // bmaptool checks every mapped range against the bmap's checksums while copying.
        try runChecked(["bmaptool", "copy", "--bmap", image + ".bmap", image + ".zst", copy])
        #expect(try run(["cmp", image, copy]).status == 0)
        // The bmap maps much less than the whole 250 MiB: the unused space stays unwritten.
        let bmap = try String(contentsOfFile: image + ".bmap", encoding: .utf8)
        let match = try #require(bmap.firstMatch(of: /<MappedBlocksCount>\s*(\d+)\s*</))
        let mapped = try #require(Int(match.1))
        #expect(mapped > 0 && mapped * 4096 < 64 << 20)
    }

    @Test func corruptedImageFailsBmapVerification() throws {
        let directory = try makeTemporaryDirectory("bmap-bad")
        defer { try? FileManager.default.removeItem(at: directory) }
        try buildTestImage(into: directory, extra: ["--compress", "none"])
        let image = directory.appendingPathComponent("rpi-test.img").path
        // Flip bytes inside the boot partition's data (mapped), keeping the size.
        try runChecked(["sh", "-c", "printf 'XXXXXXXX' | dd of=\(image) bs=1 seek=\(1 << 20 + 8192) conv=notrunc status=none"])
        let copy = try run(["bmaptool", "copy", image, directory.appendingPathComponent("copy.img").path])
        #expect(copy.status != 0)
        #expect((copy.stderr + copy.stdout).lowercased().contains("checksum"))
    }

    @Test func compressedVariantsDecompressToTheImage() throws {
        let directory = try makeTemporaryDirectory("compressed")
        defer { try? FileManager.default.removeItem(at: directory) }
        let outputs = try buildTestImage(into: directory, extra: ["--compress", "zst,xz,gz"])
        let image = directory.appendingPathComponent("rpi-test.img").path
        #expect(outputs.count == 5)
        for (suffix, tool) in [("zst", "zstd"), ("xz", "xz"), ("gz", "gzip")] {
            let plain = directory.appendingPathComponent("from-\(suffix).img").path
            try runChecked(["sh", "-c", "\(tool) -dc \(image).\(suffix) > \(plain)"])
            #expect(try run(["cmp", image, plain]).status == 0, "\(suffix) does not decompress to the image")
        }
    }

    @Test func helpDescribesTheInterface() throws {
        let help = try run([buildScript, "--help"])
        #expect(help.status == 0)
        for option in ["--out", "--size", "--compress", "--epoch", "SOURCE_DATE_EPOCH"] {
            #expect(help.stdout.contains(option))
        }
    }

    @Test(arguments: [
        (["--size", "50MiB"], "at least 110MiB"),
        (["--size", "lots"], "not a size"),
        (["--compress", "lz4"], "unknown compression"),
        (["--frobnicate"], "unknown argument"),
        (["--epoch", "yesterday"], "seconds since 1970"),
    ])
    func refusesBadArgumentsWithAReason(arguments: [String], reason: String) throws {
        let directory = try makeTemporaryDirectory("bad-args")
        defer { try? FileManager.default.removeItem(at: directory) }
        let result = try run([buildScript, "--out", directory.path] + arguments)
        #expect(result.status != 0)
        #expect(result.stderr.contains(reason), "stderr was: \(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: directory.appendingPathComponent("rpi-test.img").path))
    }

    @Test func sizeOptionGrowsTheRootPartition() throws {
        let directory = try makeTemporaryDirectory("size")
        defer { try? FileManager.default.removeItem(at: directory) }
        try buildTestImage(into: directory, extra: ["--size", "300MiB", "--compress", "none", "--name", "big"])
        let image = directory.appendingPathComponent("big.img").path
        let attributes = try FileManager.default.attributesOfItem(atPath: image)
        #expect((attributes[.size] as? NSNumber)?.intValue == 300 << 20)
        let json = try runChecked(["sfdisk", "--json", image]).stdout
        #expect(json.contains("\"size\": \(199 * 2048)"))
    }
}
