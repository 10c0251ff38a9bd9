using System.Buffers.Binary;
using System.IO.Compression;
using MixerFlow.Host;
using MixerFlow.Host.Data;
using SixLabors.ImageSharp;
using SixLabors.ImageSharp.Formats.Jpeg;
using SixLabors.ImageSharp.PixelFormats;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>The data loader on small IDX, CIFAR-10 and image files written for each test, and on the bundled data set.</summary>
public sealed class DataTests : IDisposable
{
    readonly string dir = Directory.CreateTempSubdirectory("mixerflow-data-tests-").FullName;

    public void Dispose() => Directory.Delete(dir, recursive: true);

    string PathOf(params string[] parts) => Path.Combine(new[] { dir }.Concat(parts).ToArray());

    static void Write(string path, byte[] content, bool gzip)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        if (!gzip)
        {
            File.WriteAllBytes(path, content);
            return;
        }
        using var file = File.Create(path);
        using var zip = new GZipStream(file, CompressionLevel.Fastest);
        zip.Write(content);
    }

    static byte[] Idx(int magic, int[] dims, byte[] body)
    {
        var content = new byte[4 + 4 * dims.Length + body.Length];
        BinaryPrimitives.WriteInt32BigEndian(content, magic);
        for (int i = 0; i < dims.Length; i++) BinaryPrimitives.WriteInt32BigEndian(content.AsSpan(4 + 4 * i), dims[i]);
        body.CopyTo(content, 4 + 4 * dims.Length);
        return content;
    }

    static byte[] IdxImages(int count, int height, int width, byte[] pixels) =>
        Idx(0x00000803, new[] { count, height, width }, pixels);

    static byte[] IdxLabels(int[] labels) => Idx(0x00000801, new[] { labels.Length }, labels.Select(l => (byte)l).ToArray());

    /// <summary>Pixels that differ in every position and image, so any mix-up of order or layout shows.</summary>
    static byte[] Pattern(int count, int size, int salt) =>
        Enumerable.Range(0, count * size).Select(i => (byte)((i * 7 + salt) % 256)).ToArray();

    static byte[] ImageAt(byte[] pixels, int index, int size) => pixels[(index * size)..((index + 1) * size)];

    static UserError Fails(string? path, int c, int h, int w) =>
        Assert.Throws<UserError>(() => DatasetLoader.Load(path, c, h, w));

    // ---------------------------------------------------------------- IDX

    [Theory]
    [InlineData(false, "")]
    [InlineData(true, ".gz")]
    public void Idx_folder_gives_the_train_and_t10k_splits_with_exact_pixels_and_labels(bool gzip, string suffix)
    {
        // 4 x 3 (height x width) so that a swapped height and width would show.
        var trainPixels = Pattern(5, 12, 1);
        var testPixels = Pattern(2, 12, 100);
        int[] trainLabels = { 3, 1, 4, 1, 5 }, testLabels = { 9, 2 };
        Write(PathOf("train-images-idx3-ubyte" + suffix), IdxImages(5, 4, 3, trainPixels), gzip);
        Write(PathOf("train-labels-idx1-ubyte" + suffix), IdxLabels(trainLabels), gzip);
        Write(PathOf("t10k-images-idx3-ubyte" + suffix), IdxImages(2, 4, 3, testPixels), gzip);
        Write(PathOf("t10k-labels-idx1-ubyte" + suffix), IdxLabels(testLabels), gzip);

        var splits = DatasetLoader.Load(dir, 1, 4, 3);

        Assert.Equal((5, 1, 4, 3), (splits.Train.Count, splits.Train.Channels, splits.Train.Height, splits.Train.Width));
        Assert.Equal(2, splits.HeldOut.Count);
        Assert.Equal(trainPixels, splits.Train.Pixels);
        Assert.Equal(trainLabels, splits.Train.Labels);
        Assert.Equal(testPixels, splits.HeldOut.Pixels);
        Assert.Equal(testLabels, splits.HeldOut.Labels);
        Assert.Contains("5 train / 2 test", splits.Description);
    }

    [Fact]
    public void A_single_idx_file_finds_its_labels_beside_it_and_is_split_90_10_by_seed()
    {
        // Image i is filled with the value i and labelled i % 10, so every image can be checked against its label.
        const int n = 30;
        var pixels = Enumerable.Range(0, n).SelectMany(i => Enumerable.Repeat((byte)i, 4)).ToArray();
        Write(PathOf("train-images-idx3-ubyte.gz"), IdxImages(n, 2, 2, pixels), gzip: true);
        Write(PathOf("train-labels-idx1-ubyte.gz"), IdxLabels(Enumerable.Range(0, n).Select(i => i % 10).ToArray()), gzip: true);

        var a = DatasetLoader.Load(PathOf("train-images-idx3-ubyte.gz"), 1, 2, 2, seed: 7);
        var b = DatasetLoader.Load(PathOf("train-images-idx3-ubyte.gz"), 1, 2, 2, seed: 7);
        var c = DatasetLoader.Load(PathOf("train-images-idx3-ubyte.gz"), 1, 2, 2, seed: 8);

        Assert.Equal(27, a.Train.Count);
        Assert.Equal(3, a.HeldOut.Count);
        var seen = new List<int>();
        foreach (var part in new[] { a.Train, a.HeldOut })
            for (int i = 0; i < part.Count; i++)
            {
                int value = part.Pixels[i * 4];
                Assert.All(ImageAt(part.Pixels, i, 4), p => Assert.Equal(value, p));
                Assert.Equal(value % 10, part.Labels![i]);
                seen.Add(value);
            }
        Assert.Equal(Enumerable.Range(0, n), seen.Order());
        Assert.Equal(a.HeldOut.Pixels, b.HeldOut.Pixels);
        Assert.NotEqual(a.HeldOut.Pixels, c.HeldOut.Pixels);
    }

    [Fact]
    public void Format_is_recognised_by_content_not_by_name()
    {
        Write(PathOf("pictures.png"), IdxImages(10, 2, 2, Pattern(10, 4, 3)), gzip: false);
        var splits = DatasetLoader.Load(PathOf("pictures.png"), 1, 2, 2);
        Assert.Equal(10, splits.Train.Count + splits.HeldOut.Count);
        Assert.Null(splits.Train.Labels);
    }

    [Theory]
    [InlineData(false, "the file holds only 56")]
    [InlineData(true, "it decompresses to only 56")]
    public void A_truncated_idx_file_is_an_error_naming_the_file_and_both_sizes(bool gzip, string actual)
    {
        // The header promises 3 images of 4x4: 16 + 48 = 64 bytes; only 40 pixel bytes follow.
        var full = IdxImages(3, 4, 4, Pattern(3, 16, 0));
        var file = PathOf("train-images-idx3-ubyte" + (gzip ? ".gz" : ""));
        Write(file, full[..56], gzip);

        var e = Fails(dir, 1, 4, 4);

        Assert.Contains(file, e.Message);
        Assert.Contains("needs 64 bytes", e.Message);
        Assert.Contains(actual, e.Message);
    }

    [Fact]
    public void A_cut_off_gzip_file_is_an_error_naming_the_file()
    {
        var file = PathOf("t10k-images-idx3-ubyte.gz");
        Write(file, IdxImages(50, 8, 8, Pattern(50, 64, 0)), gzip: true);
        var bytes = File.ReadAllBytes(file);
        File.WriteAllBytes(file, bytes[..(bytes.Length / 2)]);

        Assert.Contains(file, Fails(dir, 1, 8, 8).Message);
    }

    [Theory]
    [InlineData(1 << 21, 1 << 21, 1 << 21)]
    [InlineData(int.MaxValue, int.MaxValue, int.MaxValue)]
    [InlineData(1 << 20, 1 << 10, 1 << 10)]
    public void An_idx_header_whose_size_overflows_is_an_error_naming_the_file_and_dimensions(int count, int height, int width)
    {
        var file = PathOf("t10k-images-idx3-ubyte");
        Write(file, IdxImages(count, height, width, new byte[64]), gzip: false);

        var e = Fails(dir, 1, height, width);

        Assert.Contains(file, e.Message);
        Assert.Contains($"{count} images of {height}x{width}", e.Message);
        Assert.Contains("corrupt IDX header", e.Message);
    }

    [Fact]
    public void A_gzip_file_with_garbled_compressed_data_is_reported_as_damaged()
    {
        var file = PathOf("t10k-images-idx3-ubyte.gz");
        Write(file, IdxImages(50, 8, 8, Pattern(50, 64, 0)), gzip: true);
        var bytes = File.ReadAllBytes(file);
        for (int i = 10; i < bytes.Length - 8; i++) bytes[i] = (byte)(0xA5 ^ i * 31);   // the 10-byte gzip header kept
        File.WriteAllBytes(file, bytes);

        var e = Fails(dir, 1, 8, 8);

        Assert.Contains(file, e.Message);
        Assert.Contains("is a damaged gzip file", e.Message);
        Assert.DoesNotContain("unsupported compression", e.Message);
    }

    [Fact]
    public void An_idx_file_with_a_wrong_magic_is_an_error_naming_the_file()
    {
        var content = IdxImages(2, 2, 2, new byte[8]);
        BinaryPrimitives.WriteInt32BigEndian(content, unchecked((int)0xDEADBEEF));
        var file = PathOf("t10k-images-idx3-ubyte");
        Write(file, content, gzip: false);

        var e = Fails(dir, 1, 2, 2);

        Assert.Contains(file, e.Message);
        Assert.Contains("0xDEADBEEF", e.Message);
        Assert.Contains("0x00000803", e.Message);
    }

    [Fact]
    public void Labels_that_do_not_match_the_image_count_are_an_error()
    {
        Write(PathOf("t10k-images-idx3-ubyte"), IdxImages(4, 2, 2, new byte[16]), gzip: false);
        Write(PathOf("t10k-labels-idx1-ubyte"), IdxLabels(new[] { 1, 2, 3 }), gzip: false);

        var e = Fails(dir, 1, 2, 2);

        Assert.Contains("3 labels", e.Message);
        Assert.Contains("4 images", e.Message);
    }

    [Fact]
    public void Idx_images_of_another_size_than_the_model_are_refused_not_resized()
    {
        Write(PathOf("t10k-images-idx3-ubyte"), IdxImages(4, 4, 3, new byte[48]), gzip: false);

        var e = Fails(dir, 1, 28, 28);

        Assert.Contains("1x4x3", e.Message);
        Assert.Contains("1x28x28", e.Message);
    }

    // ---------------------------------------------------------------- CIFAR-10

    static byte[] CifarRecords(int[] labels, int salt)
    {
        var content = new byte[labels.Length * 3073];
        for (int r = 0; r < labels.Length; r++)
        {
            content[r * 3073] = (byte)labels[r];
            Pattern(1, 3072, salt + r).CopyTo(content, r * 3073 + 1);
        }
        return content;
    }

    [Fact]
    public void Cifar_batch_folder_gives_train_batches_in_order_and_the_test_batch()
    {
        var batch1 = CifarRecords(new[] { 0, 9, 4 }, 10);
        var batch2 = CifarRecords(new[] { 7, 2 }, 50);
        var test = CifarRecords(new[] { 5, 6 }, 90);
        // Written out of order: data_batch_2 must still come after data_batch_1 (and before a _10, were there one).
        Write(PathOf("data_batch_2.bin"), batch2, gzip: false);
        Write(PathOf("data_batch_1.bin"), batch1, gzip: false);
        Write(PathOf("test_batch.bin"), test, gzip: false);
        File.WriteAllText(PathOf("batches.meta.txt"), "airplane\nautomobile\n");

        var splits = DatasetLoader.Load(dir, 3, 32, 32);

        Assert.Equal((5, 3, 32, 32), (splits.Train.Count, splits.Train.Channels, splits.Train.Height, splits.Train.Width));
        Assert.Equal(2, splits.HeldOut.Count);
        Assert.Equal(new[] { 0, 9, 4, 7, 2 }, splits.Train.Labels);
        Assert.Equal(new[] { 5, 6 }, splits.HeldOut.Labels);
        Assert.Equal(batch1[1..3073], ImageAt(splits.Train.Pixels, 0, 3072));
        Assert.Equal(batch2[3074..], ImageAt(splits.Train.Pixels, 4, 3072));
        Assert.Equal(test[3074..], ImageAt(splits.HeldOut.Pixels, 1, 3072));
    }

    [Fact]
    public void A_cifar_batch_that_is_not_whole_records_is_an_error_naming_the_file()
    {
        var file = PathOf("data_batch_1.bin");
        Write(file, CifarRecords(new[] { 1, 2 }, 0)[..6000], gzip: false);
        Write(PathOf("test_batch.bin"), CifarRecords(new[] { 1 }, 0), gzip: false);

        var e = Fails(dir, 3, 32, 32);

        Assert.Contains(file, e.Message);
        Assert.Contains("6000 bytes", e.Message);
        Assert.Contains("3073", e.Message);
    }

    [Fact]
    public void Cifar_data_for_a_grey_model_is_a_shape_error()
    {
        Write(PathOf("test_batch.bin"), CifarRecords(new[] { 1, 2 }, 0), gzip: false);

        var e = Fails(dir, 1, 32, 32);

        Assert.Contains("3x32x32", e.Message);
        Assert.Contains("1x32x32", e.Message);
    }

    // ---------------------------------------------------------------- image folders

    static void SavePng<TPixel>(Image<TPixel> image, string path) where TPixel : unmanaged, IPixel<TPixel>
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        using (image) image.SaveAsPng(path);
    }

    static void SaveJpeg<TPixel>(Image<TPixel> image, string path) where TPixel : unmanaged, IPixel<TPixel>
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        using (image) image.SaveAsJpeg(path, new JpegEncoder { Quality = 95 });
    }

    [Fact]
    public void Png_folder_is_resized_to_cover_then_centre_cropped()
    {
        // 40 wide x 10 high: columns 0-9 are 0, 10-29 are 128, 30-39 are 255. Covering 10x10 keeps the scale
        // and crops columns 15-24, all 128; squashing instead would bring in the 0 and 255 bands.
        for (int i = 0; i < 12; i++)
        {
            var image = new Image<L8>(40, 10);
            for (int y = 0; y < 10; y++)
                for (int x = 0; x < 40; x++)
                    image[x, y] = new L8(x < 10 ? (byte)0 : x < 30 ? (byte)128 : (byte)255);
            SavePng(image, PathOf($"band{i:D2}")); // no extension: recognised by content
        }

        var splits = DatasetLoader.Load(dir, 1, 10, 10);

        Assert.Equal(11, splits.Train.Count);
        Assert.Equal(1, splits.HeldOut.Count);
        Assert.Equal((1, 10, 10), (splits.Train.Channels, splits.Train.Height, splits.Train.Width));
        Assert.Null(splits.Train.Labels);
        Assert.All(splits.Train.Pixels.Concat(splits.HeldOut.Pixels), p => Assert.Equal(128, p));
    }

    [Fact]
    public void Png_folder_for_an_rgb_model_keeps_each_channel_of_a_solid_colour()
    {
        for (int i = 0; i < 3; i++)
            SavePng(new Image<Rgb24>(60, 30, new Rgb24(10, 120, 250)), PathOf($"solid{i}.png"));

        var splits = DatasetLoader.Load(dir, 3, 16, 16);

        Assert.Equal((2, 1), (splits.Train.Count, splits.HeldOut.Count));
        var image = ImageAt(splits.Train.Pixels, 0, 3 * 256);
        Assert.All(image[..256], p => Assert.Equal(10, p));
        Assert.All(image[256..512], p => Assert.Equal(120, p));
        Assert.All(image[512..], p => Assert.Equal(250, p));
    }

    [Fact]
    public void Jpeg_folder_is_decoded_resized_and_converted_to_grey_and_to_rgb()
    {
        for (int i = 0; i < 4; i++)
            SaveJpeg(new Image<Rgb24>(64, 48, new Rgb24(200, 100, 50)), PathOf($"photo{i}.jpeg"));

        var rgb = DatasetLoader.Load(dir, 3, 8, 12);
        var grey = DatasetLoader.Load(dir, 1, 8, 12);

        Assert.Equal((3, 8, 12), (rgb.Train.Channels, rgb.Train.Height, rgb.Train.Width));
        Assert.Equal((3, 1), (rgb.Train.Count, rgb.HeldOut.Count));
        var image = ImageAt(rgb.Train.Pixels, 0, 3 * 96);
        // JPEG is lossy: a solid colour comes back within a few levels.
        Assert.All(image[..96], p => Assert.InRange(p, 196, 204));
        Assert.All(image[96..192], p => Assert.InRange(p, 96, 104));
        Assert.All(image[192..], p => Assert.InRange(p, 46, 54));
        // BT.709 luminance of (200, 100, 50): 0.2126 * 200 + 0.7152 * 100 + 0.0722 * 50 = 117.6
        Assert.Equal((1, 8, 12), (grey.Train.Channels, grey.Train.Height, grey.Train.Width));
        Assert.All(grey.Train.Pixels, p => Assert.InRange(p, 113, 122));
    }

    [Fact]
    public void Class_subfolders_become_labels_in_name_order()
    {
        foreach (var (name, value) in new[] { ("dog", (byte)200), ("cat", (byte)10) })
            for (int i = 0; i < 5; i++)
                SavePng(new Image<L8>(8, 8, new L8(value)), PathOf(name, $"{i}.png"));
        File.WriteAllText(PathOf("README.txt"), "not an image");

        var splits = DatasetLoader.Load(dir, 1, 4, 4);

        Assert.Equal(10, splits.Train.Count + splits.HeldOut.Count);
        foreach (var part in new[] { splits.Train, splits.HeldOut })
            for (int i = 0; i < part.Count; i++)
                Assert.Equal(part.Pixels[i * 16] == 10 ? 0 : 1, part.Labels![i]); // cat = 0, dog = 1
        Assert.Contains(0, splits.Train.Labels!);
        Assert.Contains(1, splits.Train.Labels!);
        Assert.Contains("2 classes (cat, dog)", splits.Description);
    }

    [Fact]
    public void An_empty_class_folder_is_refused_naming_it()
    {
        for (int i = 0; i < 3; i++) SavePng(new Image<L8>(4, 4, new L8(1)), PathOf("cat", $"{i}.png"));
        Directory.CreateDirectory(PathOf("dog"));
        File.WriteAllText(PathOf("dog", "notes.txt"), "no images here");

        var e = Assert.Throws<UserError>(() => DatasetLoader.Load(dir, 1, 4, 4));
        Assert.Contains(PathOf("dog"), e.Message);
    }

    [Fact]
    public void A_folder_with_images_and_subfolders_is_unlabelled()
    {
        for (int i = 0; i < 3; i++) SavePng(new Image<L8>(4, 4, new L8(1)), PathOf($"{i}.png"));
        SavePng(new Image<L8>(4, 4, new L8(2)), PathOf("extra", "x.png"));

        var splits = DatasetLoader.Load(dir, 1, 4, 4);

        Assert.Null(splits.Train.Labels);
        Assert.Equal(3, splits.Train.Count + splits.HeldOut.Count);
    }

    [Fact]
    public void An_image_over_4096_pixels_wide_is_refused_naming_the_file()
    {
        SavePng(new Image<L8>(4, 4), PathOf("small.png"));
        SavePng(new Image<L8>(4097, 1), PathOf("wide.png"));

        var e = Fails(dir, 1, 4, 4);

        Assert.Contains(PathOf("wide.png"), e.Message);
        Assert.Contains("4097x1", e.Message);
        Assert.Contains("4096x4096", e.Message);
    }

    [Fact]
    public void A_damaged_png_is_an_error_naming_the_file()
    {
        SavePng(new Image<L8>(4, 4), PathOf("good.png"));
        SavePng(new Image<L8>(16, 16), PathOf("bad.png"));
        var bytes = File.ReadAllBytes(PathOf("bad.png"));
        File.WriteAllBytes(PathOf("bad.png"), bytes[..40]);

        var e = Fails(dir, 1, 4, 4);

        Assert.Contains(PathOf("bad.png"), e.Message);
    }

    // ---------------------------------------------------------------- what is not data

    [Fact]
    public void An_unknown_file_is_an_error_naming_it_and_what_was_expected()
    {
        var file = PathOf("notes.txt");
        File.WriteAllText(file, "hello, world");

        var e = Fails(file, 1, 28, 28);

        Assert.Contains(file, e.Message);
        Assert.Contains("not a recognised data file", e.Message);
        Assert.Contains("IDX", e.Message);
        Assert.Contains("CIFAR-10", e.Message);
        Assert.Contains("PNG/JPEG", e.Message);
    }

    [Fact]
    public void A_single_image_file_or_a_labels_file_is_not_a_data_set()
    {
        SavePng(new Image<L8>(4, 4), PathOf("one.idx"));
        Write(PathOf("train-labels-idx1-ubyte"), IdxLabels(new[] { 1 }), gzip: false);

        Assert.Contains("single image", Fails(PathOf("one.idx"), 1, 4, 4).Message);
        Assert.Contains("labels file", Fails(PathOf("train-labels-idx1-ubyte"), 1, 4, 4).Message);
    }

    [Fact]
    public void A_folder_without_data_and_a_missing_path_are_errors()
    {
        File.WriteAllText(PathOf("notes.txt"), "nothing here");

        Assert.Contains("holds no PNG or JPEG images", Fails(dir, 1, 4, 4).Message);
        Assert.Contains("does not exist", Fails(PathOf("absent"), 1, 4, 4).Message);
    }

    // ---------------------------------------------------------------- the bundled data set

    [Fact]
    public void The_bundled_default_is_9000_train_and_1000_held_out_fashion_mnist_images()
    {
        var splits = DatasetLoader.Load(null, 1, 28, 28);

        foreach (var (part, count) in new[] { (splits.Train, 9000), (splits.HeldOut, 1000) })
        {
            Assert.Equal((count, 1, 28, 28), (part.Count, part.Channels, part.Height, part.Width));
            Assert.All(part.Labels!, l => Assert.InRange(l, 0, 9));
            Assert.Equal(10, part.Labels!.Distinct().Count());
        }
        Assert.Contains(splits.Train.Pixels, p => p > 200); // real pictures, not a zero-filled buffer
        Assert.Contains("Fashion-MNIST", splits.Description);
        Assert.Equal(splits.HeldOut.Labels, DatasetLoader.Load(null, 1, 28, 28).HeldOut.Labels);
    }

    [Fact]
    public void The_bundled_default_refuses_a_model_of_another_shape()
    {
        var e = Fails(null, 3, 32, 32);

        Assert.Contains("1x28x28", e.Message);
        Assert.Contains("--data", e.Message);
    }

    [Fact]
    public void The_environment_variable_overrides_where_the_bundled_data_set_is()
    {
        Write(PathOf("fashion-mnist", "t10k-images-idx3-ubyte.gz"), IdxImages(20, 28, 28, Pattern(20, 784, 5)), gzip: true);
        var before = Environment.GetEnvironmentVariable(DatasetLoader.DataEnvironmentVariable);
        try
        {
            Environment.SetEnvironmentVariable(DatasetLoader.DataEnvironmentVariable, dir);
            var splits = DatasetLoader.Load(null, 1, 28, 28);
            Assert.Equal((18, 2), (splits.Train.Count, splits.HeldOut.Count));
            Assert.Contains(PathOf("fashion-mnist"), splits.Description);
        }
        finally
        {
            Environment.SetEnvironmentVariable(DatasetLoader.DataEnvironmentVariable, before);
        }
    }

    // ---------------------------------------------------------------- ImageDataset

    [Fact]
    public void Batch_is_a_float_cpu_tensor_holding_the_bytes()
    {
        var pixels = Pattern(3, 2 * 2 * 3, 0);
        pixels[0] = 255;
        var data = new ImageDataset(pixels, 3, 2, 2, 3, null, "test");

        using var batch = data.Batch(new[] { 2, 0 });

        Assert.Equal(ScalarType.Float32, batch.dtype);
        Assert.Equal(TorchSharp.DeviceType.CPU, batch.device_type);
        Assert.Equal(new long[] { 2, 2, 2, 3 }, batch.shape);
        var expected = ImageAt(pixels, 2, 12).Concat(ImageAt(pixels, 0, 12)).Select(b => (float)b);
        Assert.Equal(expected, batch.data<float>().ToArray());
    }

    [Fact]
    public void Subset_takes_images_and_labels_in_the_order_asked()
    {
        var pixels = new byte[] { 1, 1, 2, 2, 3, 3 };
        var data = new ImageDataset(pixels, 3, 1, 1, 2, new[] { 7, 8, 9 }, "test");

        var subset = data.Subset(new[] { 2, 0 });

        Assert.Equal(new byte[] { 3, 3, 1, 1 }, subset.Pixels);
        Assert.Equal(new[] { 9, 7 }, subset.Labels);
        Assert.Throws<ArgumentOutOfRangeException>(() => data.Subset(new[] { 3 }));
    }
}
