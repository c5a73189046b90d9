import Foundation
import TestSupport

/// A card image built the way the project's images are: a root tree packed with
/// `mkfs.ext4 -d`, a vfat boot partition, a table written by sfdisk, all in one file.
struct DiskImage {
    static let bootStartSector = 2048          // 1 MiB
    static let bootSectors = 16384             // 8 MiB
    static let rootStartSector = 18432         // 9 MiB
    var path: String
    var rootOffset: UInt64 { UInt64(Self.rootStartSector) * 512 }
    let directory: TemporaryDirectory

    struct Options {
        var label = "dos"
        var rootSizeMiB = 24
        var rootLabel = "rootfs"
        /// Files replaced or added in the root tree (path relative to the root → contents).
        var files: [String: String] = [:]
        /// Extra mkfs.ext4 arguments (e.g. a tiny inode count for the full-filesystem case).
        var mkfsArguments: [String] = []
        /// mkfs.ext2, mkfs.ext3 or mkfs.ext4.
        var mkfs = "mkfs.ext4"
        /// Replace the ext4 root by a second vfat filesystem.
        var rootIsVfat = false
    }

    static let passwd = """
        root:x:0:0:root:/root:/bin/bash
        daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
        bin:x:2:2:bin:/bin:/usr/sbin/nologin

        """.replacingOccurrences(of: "\n\n", with: "\n")
    static let shadow = """
        root:*:19000:0:99999:7:::
        daemon:*:19000:0:99999:7:::
        bin:*:19000:0:99999:7:::

        """.replacingOccurrences(of: "\n\n", with: "\n")
    static let group = """
        root:x:0:
        daemon:x:1:
        bin:x:2:
        sudo:x:27:
        shadow:x:42:
        users:x:100:
        nogroup:x:65534:

        """.replacingOccurrences(of: "\n\n", with: "\n")
    static let gshadow = """
        root:*::
        daemon:*::
        bin:*::
        sudo:*::
        shadow:*::
        users:*::
        nogroup:*::

        """.replacingOccurrences(of: "\n\n", with: "\n")

    init(_ options: Options = Options()) throws {
        directory = try TemporaryDirectory()
        let root = directory.file("root")
        let fm = FileManager.default
        for dir in ["etc/skel/.config/app", "bin", "usr/sbin", "root", "home", "tmp"] {
            try fm.createDirectory(atPath: root + "/" + dir, withIntermediateDirectories: true)
        }
        var files = [
            "etc/passwd": Self.passwd, "etc/shadow": Self.shadow, "etc/group": Self.group,
            "etc/gshadow": Self.gshadow,
            "etc/login.defs": "# test login.defs\nUID_MIN 1000\nUID_MAX 60000\nGID_MIN 1000\nGID_MAX 60000\nPASS_MAX_DAYS 99999\n",
            "etc/skel/.bashrc": "# ~/.bashrc from skel\nexport EDITOR=vi\n",
            "etc/skel/.profile": "# ~/.profile\n. ~/.bashrc\n",
            "etc/skel/.config/app/settings": "answer = 42\n",
            "bin/bash": "#!/bin/sh\n", "bin/sh": "#!/bin/sh\n", "usr/sbin/nologin": "#!/bin/sh\nexit 1\n",
        ]
        for (k, v) in options.files { files[k] = v }
        for (relative, text) in files {
            let target = root + "/" + relative
            try fm.createDirectory(atPath: (target as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            try Data(text.utf8).write(to: URL(fileURLWithPath: target))
        }
        try fm.createSymbolicLink(atPath: root + "/etc/skel/.config/editor", withDestinationPath: "app/settings")
        for executable in ["bin/bash", "bin/sh", "usr/sbin/nologin"] {
            try fm.setAttributes([.posixPermissions: 0o755], ofItemAtPath: root + "/" + executable)
        }
        try fm.setAttributes([.posixPermissions: 0o700], ofItemAtPath: root + "/root")
        for secret in ["etc/shadow", "etc/gshadow"] where fm.fileExists(atPath: root + "/" + secret) {
            try fm.setAttributes([.posixPermissions: 0o640, .ownerAccountID: 0, .groupOwnerAccountID: 42],
                                 ofItemAtPath: root + "/" + secret)
        }

        path = directory.file("card.img")
        let boot = directory.file("boot.img"), fs = directory.file("root.img")
        try Shell.must(["mkfs.vfat", "-n", "BOOT", "-C", boot, String(Self.bootSectors / 2)])
        if options.rootIsVfat {
            try Shell.must(["mkfs.vfat", "-n", "NOTEXT", "-C", fs, String(options.rootSizeMiB * 1024)])
        } else {
            try Shell.must([options.mkfs, "-q", "-F", "-L", options.rootLabel, "-d", root]
                           + options.mkfsArguments + [fs, "\(options.rootSizeMiB)M"])
        }
        let totalSectors = Self.rootStartSector + options.rootSizeMiB * 2048 + 2048
        try Shell.must(["truncate", "-s", String(totalSectors * 512), path])
        let rootType = options.label == "gpt" ? "0FC63DAF-8483-4772-8E79-3D69D8477DE4" : "83"
        let bootType = options.label == "gpt" ? "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" : "c"
        try Shell.must(["sfdisk", "-q", path], stdin: """
            label: \(options.label)
            start=\(Self.bootStartSector), size=\(Self.bootSectors), type=\(bootType)
            start=\(Self.rootStartSector), size=\(options.rootSizeMiB * 2048), type=\(rootType)

            """)
        try Shell.must(["dd", "if=\(boot)", "of=\(path)", "bs=512", "seek=\(Self.bootStartSector)", "conv=notrunc", "status=none"])
        try Shell.must(["dd", "if=\(fs)", "of=\(path)", "bs=512", "seek=\(Self.rootStartSector)", "conv=notrunc", "status=none"])
        try? fm.removeItem(atPath: boot)
        try? fm.removeItem(atPath: fs)
    }

    /// `debugfs -R CMD` on the root partition, read-only.
    func debugfs(_ command: String) throws -> String {
        try Shell.must(["debugfs", "-R", command, "\(path)?offset=\(rootOffset)"])
    }
}

/// The image attached to a loop device with its partitions, mounted read-only; detached
/// and unmounted on `close()` (the tests call it in a defer).
final class MountedImage {
    let loop: String
    let mountPoint: String
    private var closed = false

    init(image: String, partition: Int, in directory: TemporaryDirectory) throws {
        loop = try Shell.must(["losetup", "--find", "--show", "--partscan", "--read-only", image])
            .trimmingCharacters(in: .whitespacesAndNewlines)
        mountPoint = directory.file("mnt")
        do {
            try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
            let device = "\(loop)p\(partition)"
            // The partition node appears asynchronously after the partition scan.
            for _ in 0..<20 where !FileManager.default.fileExists(atPath: device) { usleep(100_000) }
            if !FileManager.default.fileExists(atPath: device) {
                // Kernels built without the MBR/GPT parsers (this VM's) scan nothing;
                // partx adds the partitions through BLKPG from util-linux's own reading.
                try Shell.must(["partx", "-a", loop])
            }
            try Shell.must(["mount", "-o", "ro", device, mountPoint])
        } catch {
            _ = try? Shell.run(["losetup", "-d", loop])
            throw error
        }
    }

    func close() {
        guard !closed else { return }
        closed = true
        _ = try? Shell.run(["umount", mountPoint])
        _ = try? Shell.run(["partx", "-d", loop])
        _ = try? Shell.run(["losetup", "-d", loop])
    }

    deinit { close() }
}
