import Foundation
import Testing
import BlockDevices
import TOMLKit
@testable import Station

/// The profile format of images/README.md: what parses, and the line-precise errors for what does not.
struct ProfileTests {
    static let base = "/srv/images/board"

    func parse(_ text: String) throws -> Profile {
        try Profile.parse(toml: text, source: "board/profile.toml", baseDirectory: Self.base)
    }

    /// Parses `text` expecting a ConfigError, and returns it.
    func failure(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> ConfigError? {
        do {
            let profile = try parse(text)
            Issue.record("expected an error, parsed \(profile.name)", sourceLocation: sourceLocation)
            return nil
        } catch let error as ConfigError {
            return error
        } catch {
            Issue.record("unexpected error type: \(error)", sourceLocation: sourceLocation)
            return nil
        }
    }

    /// A well-formed SHA-512 crypt hash (86 characters after the salt).
    static let hash = "$6$salt$" + String(repeating: "a", count: 86)

    static let complete = """
        name = "board"
        description = "A board"
        kind = "sd"

        [image]
        file = "board.img.zst"
        bmap = "board.img.bmap"
        verify = false
        min_device_size = "2GiB"

        [[partitions]]
        number = 1
        role = "boot"
        filesystem = "vfat"
        label = "BOOT"
        start = "1MiB"
        size = "98MiB"

        [[partitions]]
        number = 2
        role = "root"
        filesystem = "ext4"
        label = "rootfs"

        [root]
        label = "rootfs"

        [[blobs]]
        file = "u-boot.bin"
        offset = "8KiB"

        [[users]]
        name = "pi"
        groups = ["sudo", "video"]
        shell = "/bin/sh"
        gecos = "Lab user"
        hash = "\(ProfileTests.hash)"
        ssh_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK0 op@bench"]
        """

    // MARK: what parses

    @Test func completeProfileParsesEveryKey() throws {
        let profile = try parse(Self.complete)
        #expect(profile.name == "board")
        #expect(profile.summary == "A board")
        #expect(profile.kind == .sd)
        let image = try #require(profile.image)
        #expect(image.file == "/srv/images/board/board.img.zst")
        #expect(image.bmap == .file("/srv/images/board/board.img.bmap"))
        #expect(image.verify == false)
        #expect(image.minDeviceSize == 2 << 30)
        #expect(image.location.line == 6)
        #expect(profile.partitions.map(\.number) == [1, 2])
        #expect(profile.partitions[0].role == .boot && profile.partitions[0].filesystem == .vfat)
        #expect(profile.partitions[0].start == 1 << 20 && profile.partitions[0].size == 98 << 20)
        #expect(profile.partitions[1].location.line == 19)
        #expect(profile.root?.selector == .label("rootfs"))
        #expect(profile.blobs == [Profile.Blob(file: "/srv/images/board/u-boot.bin", offset: 8192,
                                               location: ConfigLocation(file: "board/profile.toml", line: 28, keyPath: "blobs[0]"))])
        let user = try #require(profile.users.first)
        #expect(user.name == "pi" && user.groups == ["sudo", "video"] && user.shell == "/bin/sh")
        #expect(user.password == .hash(Self.hash))
        #expect(user.sshKeys.count == 1)
        #expect(profile.inject)
    }

    @Test func shorthandImageAndTopLevelSettingsAsInTheStationExample() throws {
        let profile = try parse("""
            name = "board"
            image = "/abs/demo.img.zst"
            verify = true
            min_device_size = "512MiB"
            """)
        #expect(profile.image?.file == "/abs/demo.img.zst")
        #expect(profile.image?.bmap == .discover)
        #expect(profile.image?.verify == true)
        #expect(profile.image?.minDeviceSize == 512 << 20)
        #expect(profile.inject == false)
        #expect(profile.root == nil)
    }

    @Test func rootDefaultsToThePartitionWithRoleRootWhenUsersAreGiven() throws {
        let profile = try parse("""
            name = "board"
            image = "a.img"
            [[partitions]]
            number = 3
            role = "root"
            filesystem = "ext4"
            [[users]]
            name = "lab"
            """)
        #expect(profile.root?.selector == .partition(3))
        #expect(profile.users.first?.password == .generate)
    }

    @Test func bmapFalseMeansWriteEveryByte() throws {
        let profile = try parse("name = \"board\"\nimage = \"x.iso\"\nbmap = false\ninject = false\n")
        #expect(profile.image?.bmap == Profile.BmapSource.none)
        #expect(profile.inject == false)
    }

    @Test func tegraProfileKeepsTypedInputs() throws {
        let profile = try parse("""
            name = "board"
            kind = "tegra"
            [tegra]
            soc = "tegra124"
            usb_product_ids = [0x7140]
            miniloader = "miniloader/tegra124-miniloader.bin"
            miniloader_entry = 0x4000E000
            bct = "PM375_Hynix_2GB_H5TC4G63AFR_RDA_924MHz.bct"
            uboot = "u-boot-nodtb-tegra.bin"
            uboot_dtb = "u-boot.dtb"
            uboot_bss_size = "256KiB"
            load_address = 0x80108000
            ram_base = 0x80000000
            boot_device = "emmc"
            [tegra.env]
            serial_label = "unit"
            """)
        let tegra = try #require(profile.tegra)
        #expect(tegra.soc == "tegra124" && tegra.usbProductIDs == [0x7140])
        #expect(tegra.miniloader == "/srv/images/board/miniloader/tegra124-miniloader.bin")
        #expect(tegra.miniloaderEntry == 0x4000_E000 && tegra.loadAddress == 0x8010_8000 && tegra.ramBase == 0x8000_0000)
        #expect(tegra.ubootBSSSize == 256 << 10 && tegra.bootDevice == "emmc")
        #expect(tegra.environment == ["serial_label": "unit"])
        #expect(profile.image == nil)
    }

    // MARK: line-precise errors

    @Test func wrongTypeNamesLineKeyAndFoundValue() throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\nverify = \"yes\"\n"))
        #expect(error.description == "board/profile.toml:3: verify: expected a boolean, found string \"yes\"")
    }

    @Test func sizesLargerThanAnyCardAreNamedNotTrapped() throws {
        // Two partitions of 2^63 bytes each: their extents' sum overflowed 64 bits.
        let partitions = try #require(failure("""
            name = "board"
            image = "a.img"
            [[partitions]]
            number = 1
            role = "boot"
            start = "8388608TiB"
            size = "8388608TiB"
            [[partitions]]
            number = 2
            role = "root"
            start = "1MiB"
            size = "1MiB"
            """))
        #expect(partitions.keyPath == "partitions[0].size", "\(partitions)")
        #expect(partitions.message.contains("larger than any card"), "\(partitions)")
        let bss = try #require(failure("""
            name = "board"
            kind = "tegra"
            [tegra]
            soc = "tegra124"
            miniloader = "m.bin"
            bct = "b.bct"
            uboot = "u.bin"
            uboot_bss_size = "2GiB"
            """))
        #expect(bss.keyPath == "tegra.uboot_bss_size" && bss.message.contains("at most 1 GiB"), "\(bss)")
        let huge = try #require(failure("""
            name = "board"
            kind = "tegra"
            [tegra]
            soc = "tegra124"
            miniloader = "m.bin"
            bct = "b.bct"
            uboot = "u.bin"
            uboot_bss_size = "16000000TiB"
            """))
        #expect(huge.keyPath == "tegra.uboot_bss_size", "\(huge)")
    }

    @Test func wrongTypeInsideAnArrayOfTables() throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\n\n[[partitions]]\nnumber = 1\nrole = \"boot\"\n\n[[partitions]]\nnumber = \"two\"\nrole = \"root\"\n"))
        #expect(error.line == 9)
        #expect(error.keyPath == "partitions[1].number")
        #expect(error.message.contains("expected an integer"))
    }

    @Test func unknownKeyIsAnErrorWithASuggestion() throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\nverfy = true\n"))
        #expect(error.line == 3)
        #expect(error.keyPath == "verfy")
        #expect(error.message.contains("unknown key \"verfy\""))
        #expect(error.message.contains("did you mean \"verify\""))
    }

    @Test func unknownKeyInANestedTable() throws {
        let error = try #require(failure("name = \"board\"\n[image]\nfile = \"a.img\"\nchecksum = \"x\"\n"))
        #expect(error.line == 4 && error.keyPath == "image.checksum")
    }

    @Test func missingImageIsAnError() throws {
        let error = try #require(failure("name = \"board\"\nkind = \"sd\"\n"))
        #expect(error.keyPath == "image")
        #expect(error.line == 2)
        let withoutKind = try #require(failure("# board\nname = \"board\"\ndescription = \"x\"\n"))
        #expect(withoutKind.line == 2)
        #expect(error.message.contains("missing"))
    }

    @Test func imageTableWithoutFileIsAnErrorOnItsHeader() throws {
        let error = try #require(failure("name = \"board\"\n\n[image]\nverify = true\n"))
        #expect(error.line == 3 && error.keyPath == "image.file")
    }

    @Test(arguments: ["\"512 parsecs\"", "\"MiB\"", "\"-5MiB\"", "\"99999999999999999999\"", "true"])
    func badSizeStringIsAnError(size: String) throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\n\nmin_device_size = \(size)\n"))
        #expect(error.line == 4 && error.keyPath == "min_device_size")
    }

    @Test func sizeStringsInEveryForm() throws {
        #expect(try ByteCount.parse("512MiB") == 512 << 20)
        #expect(try ByteCount.parse("2GiB") == 2 << 30)
        #expect(try ByteCount.parse("1G") == 1 << 30)
        #expect(try ByteCount.parse("8K") == 8192)
        #expect(try ByteCount.parse("32GB") == 32_000_000_000)
        #expect(try ByteCount.parse(" 4096 ") == 4096)
        #expect(throws: ByteCount.ParseError.self) { try ByteCount.parse("1.5G") }
        #expect(throws: ByteCount.ParseError.self) { try ByteCount.parse("") }
    }

    @Test func rootWithBothPartitionAndLabelIsAnError() throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\n[root]\npartition = 2\nlabel = \"NIXOS_SD\"\n"))
        #expect(error.line == 5 && error.keyPath == "root.label")
        #expect(error.message.contains("both partition and label"))
    }

    @Test func rootPartitionThatIsNotExtIsRefused() throws {
        let error = try #require(failure("""
            name = "board"
            image = "a.img"
            [[partitions]]
            number = 1
            role = "boot"
            filesystem = "vfat"
            [root]
            partition = 1
            """))
        #expect(error.line == 8 && error.message.contains("ext2/3/4"))
    }

    @Test func usersWithoutAKnownRootPartitionAreRefused() throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\n[[users]]\nname = \"lab\"\n"))
        #expect(error.keyPath == "root")
        #expect(error.message.contains("root partition is unknown"))
    }

    @Test func blobStartingInsideAStatedPartitionIsRefused() throws {
        let error = try #require(failure("""
            name = "board"
            image = "a.img"
            [[partitions]]
            number = 1
            role = "boot"
            start = "1MiB"
            size = "64MiB"
            [[blobs]]
            file = "u-boot.bin"
            offset = "2MiB"
            """))
        #expect(error.line == 8 && error.keyPath == "blobs[0]")
        #expect(error.message.contains("inside partition 1"))
    }

    @Test func twoBlobsAtTheSameOffsetAreRefused() throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\n[[blobs]]\nfile = \"a\"\noffset = 8192\n[[blobs]]\nfile = \"b\"\noffset = \"8KiB\"\n"))
        #expect(error.line == 6 && error.keyPath == "blobs[1]")
    }

    @Test func blobOffsetMustBeSectorAligned() throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\n[[blobs]]\nfile = \"a\"\noffset = 1000\n"))
        #expect(error.line == 5 && error.message.contains("multiple of 512"))
    }

    @Test(arguments: [
        ("password = \"hunter2\"", "password", "generate"),
        ("hash = \"plaintext\"", "hash", "not an accepted crypt hash"),
        ("password = \"locked\"\nhash = \"$6$a$b\"", "hash", "both password and hash"),
        ("ssh_keys = [\"not a key\"]", "ssh_keys[0]", "SSH public key"),
        ("shell = \"bash\"", "shell", "absolute path"),
        ("gecos = \"a:b\"", "gecos", "':'"),
        ("uid = -1", "uid", "not a usable uid"),
        ("frobs = 1", "frobs", "unknown key"),
    ])
    func badUserFieldsAreRefused(line: String, key: String, message: String) throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\ninject = true\n[[partitions]]\nnumber = 2\nrole = \"root\"\nfilesystem = \"ext4\"\n[[users]]\nname = \"lab\"\n\(line)\n"))
        #expect(error.keyPath == "users[0].\(key)")
        #expect(error.line != nil)
        #expect(error.message.contains(message), "\(error)")
    }

    @Test func badUserNameAndDuplicateUsersAreRefused() throws {
        let prefix = "name = \"board\"\nimage = \"a.img\"\n[root]\npartition = 2\n"
        let bad = try #require(failure(prefix + "[[users]]\nname = \"Root User\"\n"))
        #expect(bad.keyPath == "users[0].name" && bad.line == 6)
        let twice = try #require(failure(prefix + "[[users]]\nname = \"lab\"\n[[users]]\nname = \"lab\"\n"))
        #expect(twice.keyPath == "users[1].name" && twice.line == 8)
    }

    @Test func kindSpecificTablesAreChecked() throws {
        let tegraOnSD = try #require(failure("name = \"board\"\nimage = \"a.img\"\n[tegra]\nsoc = \"tegra124\"\n"))
        #expect(tegraOnSD.keyPath == "tegra" && tegraOnSD.line == 3)
        let tegraWithoutTable = try #require(failure("name = \"board\"\nkind = \"tegra\"\n"))
        #expect(tegraWithoutTable.keyPath == "tegra")
        let unknownKind = try #require(failure("name = \"board\"\nkind = \"floppy\"\n"))
        #expect(unknownKind.line == 2 && unknownKind.message.contains("\"sd\" or \"tegra\""))
        let badSoC = try #require(failure("name = \"board\"\nkind = \"tegra\"\n[tegra]\nsoc = \"tegra999\"\nminiloader = \"m\"\nbct = \"b\"\nuboot = \"u\"\n"))
        #expect(badSoC.line == 4 && badSoC.keyPath == "tegra.soc")
    }

    @Test func syntaxErrorCarriesLineAndColumn() throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\nverify = = true\n"))
        #expect(error.line == 3)
        #expect(error.column != nil)
        #expect(error.message.hasPrefix("TOML syntax error"))
    }

    @Test func missingNameInAFileIsAnError() throws {
        let error = try #require(failure("image = \"a.img\"\n"))
        #expect(error.keyPath == "name")
    }

    @Test func injectFalseWithUsersIsContradictory() throws {
        let error = try #require(failure("name = \"board\"\nimage = \"a.img\"\ninject = false\n[root]\npartition = 2\n[[users]]\nname = \"lab\"\n"))
        #expect(error.keyPath == "inject" && error.line == 3)
    }

    @Test func settingGivenAtTopLevelAndInImageIsRefused() throws {
        let error = try #require(failure("name = \"board\"\nverify = true\n[image]\nfile = \"a.img\"\nverify = false\n"))
        #expect(error.keyPath == "image.verify" && error.line == 5)
    }
}
