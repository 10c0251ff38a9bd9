using MixerFlow.Core;
using static TorchSharp.torch;

namespace MixerFlow.Unit;

/// <summary>Patch layouts against small examples worked out by hand.</summary>
public class PatchifyTests
{
    // A 1 x 4 x 4 image holding 0..15 row by row:
    //  0  1  2  3
    //  4  5  6  7
    //  8  9 10 11
    // 12 13 14 15
    static Tensor Image(int c, int h, int w) => arange(c * h * w, dtype: float64).reshape(1, c, h, w);

    static double[][] Rows(Tensor m) =>
        Enumerable.Range(0, (int)m.shape[1]).Select(r => m[0, r].data<double>().ToArray()).ToArray();

    [Fact]
    public void Square_2x2_patches_of_a_4x4_image()
    {
        var p = new Patchify(new long[] { 1, 4, 4 }, PatchStrategy.Square, 2);
        var rows = Rows(p.Forward(Image(1, 4, 4)).Value);
        Assert.Equal(new long[] { 4, 4 }, p.OutputShape);
        Assert.Equal(new double[] { 0, 1, 4, 5 }, rows[0]);     // top-left patch
        Assert.Equal(new double[] { 2, 3, 6, 7 }, rows[1]);     // top-right
        Assert.Equal(new double[] { 8, 9, 12, 13 }, rows[2]);   // bottom-left
        Assert.Equal(new double[] { 10, 11, 14, 15 }, rows[3]); // bottom-right
    }

    [Fact]
    public void Horizontal_bands_of_two_rows()
    {
        var p = new Patchify(new long[] { 1, 4, 4 }, PatchStrategy.Bands, 2);
        var rows = Rows(p.Forward(Image(1, 4, 4)).Value);
        Assert.Equal(new double[] { 0, 1, 2, 3, 4, 5, 6, 7 }, rows[0]);
        Assert.Equal(new double[] { 8, 9, 10, 11, 12, 13, 14, 15 }, rows[1]);
    }

    [Fact]
    public void Vertical_stripes_of_one_column()
    {
        var p = new Patchify(new long[] { 1, 4, 4 }, PatchStrategy.Stripes, 1);
        var rows = Rows(p.Forward(Image(1, 4, 4)).Value);
        Assert.Equal(4, rows.Length);
        Assert.Equal(new double[] { 0, 4, 8, 12 }, rows[0]);
        Assert.Equal(new double[] { 3, 7, 11, 15 }, rows[3]);
    }

    [Fact]
    public void Channels_come_first_within_a_patch_row()
    {
        // 2 x 2 x 2: channel 0 holds 0..3, channel 1 holds 4..7; one 2x2 patch.
        var p = new Patchify(new long[] { 2, 2, 2 }, PatchStrategy.Square, 2);
        var rows = Rows(p.Forward(Image(2, 2, 2)).Value);
        Assert.Equal(new double[] { 0, 1, 2, 3, 4, 5, 6, 7 }, rows[0]);
    }

    [Theory]
    [InlineData(PatchStrategy.Square, 2)]
    [InlineData(PatchStrategy.Bands, 2)]
    [InlineData(PatchStrategy.Stripes, 3)]
    public void The_inverse_reads_a_transposed_matrix_as_its_contiguous_copy(PatchStrategy strategy, int size)
    {
        // ColumnWise returns [P, D] as a transposed view of [D, P]; Patchify's inverse reads that
        // layout directly. Both layouts must give the image back, and the same image.
        var p = new Patchify(new long[] { 2, 6, 6 }, strategy, size);
        var image = Image(2, 6, 6).repeat(3, 1, 1, 1).add(arange(3, dtype: float64).reshape(3, 1, 1, 1).mul(1000));
        var matrix = p.Forward(image).Value;
        var transposedView = matrix.transpose(1, 2).contiguous().transpose(1, 2);
        Assert.False(transposedView.is_contiguous());
        var fromView = p.Inverse(transposedView).Value;
        var fromCopy = p.Inverse(matrix.contiguous()).Value;
        Assert.True(fromView.equal(image).all().item<bool>());
        Assert.True(fromCopy.equal(image).all().item<bool>());
    }

    [Fact]
    public void Shift_rolls_the_image_cyclically()
    {
        var s = new Shift(new long[] { 1, 4, 4 }, 1, 2);
        var y = s.Forward(Image(1, 4, 4)).Value;
        // Row 0 of the output is row 3 of the input, rolled right by 2: 14 15 12 13.
        Assert.Equal(new double[] { 14, 15, 12, 13 }, y[0, 0, 0].data<double>().ToArray());
        Assert.Equal(Image(1, 4, 4).data<double>().ToArray(), s.Inverse(y).Value.data<double>().ToArray());
    }

    [Fact]
    public void Patch_sizes_that_do_not_tile_the_image_are_rejected_with_the_sizes()
    {
        var e = Assert.Throws<ArgumentException>(() => new Patchify(new long[] { 1, 28, 28 }, PatchStrategy.Square, 5));
        Assert.Contains("28", e.Message);
        Assert.Contains("5", e.Message);
    }

    [Fact]
    public void A_wrongly_shaped_input_names_the_expected_shape()
    {
        var p = new Patchify(new long[] { 1, 4, 4 }, PatchStrategy.Square, 2);
        var e = Assert.Throws<ArgumentException>(() => p.Forward(zeros(2, 1, 4, 5)));
        Assert.Contains("[batch, 1, 4, 4]", e.Message);
        Assert.Contains("[2, 1, 4, 5]", e.Message);
    }
}
